"""The site node daemon: ``fedbrats node --config site-1.toml``.

Preflight (every case checked before round 1), then join the aggregator and loop:

* task ``training`` (round r): fetch the global model if ours is not the one the round trains
  from (SHA-256 checked), train ``local_steps`` steps, form Δ = w_local − w_global, apply the
  update filters, protect it (:mod:`node.update`), stream it up;
* task ``result`` (round r): fetch the round's result, recover the new global model from it,
  evaluate it on this site's held-out cases and report Dice/HD95 (only metrics travel);
* task ``done``: leave; exit 0, or :attr:`RoundAborted.exit_code` if the federation failed.

Uses CUDA when present (``training.device = "auto"``), else the CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc

from aggregator.server import grpc_options
from fedbrats import wire
from fedbrats.config import Config
from fedbrats.errors import FedbratsError, ProtocolError, RoundAborted

_LOGGER = logging.getLogger(__name__)

#: Long-poll length for GetTask, ms.
TASK_WAIT_MS = 20_000
#: Per-RPC deadline for unary calls other than the long poll, s.
RPC_TIMEOUT_S = 60.0
#: Deadline for streaming a model or an update, s.
STREAM_TIMEOUT_S = 600.0


class AggregatorUnreachable(FedbratsError):
    """The aggregator could not be reached within ``node.connect_timeout_s``."""

    exit_code = 7


def _site_cases(cfg: Config):
    from node import data

    site = cfg.node.site_id
    root = Path(cfg.data.root).expanduser()
    if not cfg.data.root:
        raise FedbratsError(f"site {site}: data.root is empty; point it at a BraTS/FeTS folder")
    if not root.is_dir():
        raise FedbratsError(f"site {site}: data.root {root} is not a directory")
    part = Path(cfg.data.partitioning).expanduser() if cfg.data.partitioning else None
    sites = data.discover_sites(root, partitioning=part)
    if site not in sites:
        raise FedbratsError(f"site {site}: no cases for this site under {root} (sites found: "
                            f"{', '.join(sorted(sites)) or 'none'})")
    cases = sites[site]
    data.preflight(cases, labels=cfg.data.labels)
    train, val = data.split_cases(cases, val_fraction=cfg.data.val_fraction,
                                  seed=cfg.federation.seed)
    if not train:
        raise FedbratsError(f"site {site}: no training cases after the validation split "
                            f"({len(cases)} case(s), data.val_fraction {cfg.data.val_fraction})")
    return train, val


class Node:
    """One site's participation in a federation (see module docstring)."""

    def __init__(self, cfg: Config):
        from node import data
        from node.model import build_model, select_device
        from node.train import LocalTrainer, configure_torch, seed_everything
        from node.update import make_protector, make_update_filters

        self.cfg = cfg
        self.site = cfg.node.site_id
        if not self.site:
            raise FedbratsError("node.site_id is empty: say which site this node is")
        configure_torch(cfg.training)
        self.device = select_device(cfg.training.device)
        t0 = time.perf_counter()
        train, val = _site_cases(cfg)
        self.train_cases = [data.load_case(c) for c in train]
        self.val_cases = [data.load_case(c) for c in val]
        _LOGGER.info("site %s: preflight passed; %d training and %d validation case(s) loaded "
                     "in %.1f s; device %s", self.site, len(train), len(val),
                     time.perf_counter() - t0, self.device)
        seed = cfg.federation.seed * 1000 + _site_number(self.site)
        seed_everything(seed)
        self.model = build_model(cfg.model)
        self.trainer = LocalTrainer(self.model, self.train_cases, cfg.training, cfg.data.labels,
                                    self.device, seed)
        self.filters = make_update_filters(cfg)
        self.protector = make_protector(cfg)
        self.global_model: dict | None = None
        self.global_sha = b""
        self.last_completed = 0
        self.state_dir = Path(cfg.node.state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- RPC helpers -----------------------------------------------------------------------

    def _env(self, round: int = 0, stage: str = "unspecified") -> wire.Envelope:
        return wire.Envelope(self.cfg.federation.name, self.site, round, stage)

    def _call(self, what: str, fn, *args, **kwargs):
        """Call an RPC; retry UNAVAILABLE up to connect_timeout_s; map other errors."""
        deadline = time.monotonic() + self.cfg.node.connect_timeout_s
        delay = 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and time.monotonic() < deadline:
                    _LOGGER.warning("site %s: %s: aggregator unavailable (%s); retrying",
                                    self.site, what, code.name)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise AggregatorUnreachable(
                        f"site {self.site}: {what}: aggregator {self.cfg.node.aggregator} "
                        f"unreachable for {self.cfg.node.connect_timeout_s:g} s ({code.name})"
                    ) from None
                raise ProtocolError(f"site {self.site}: {what} refused by the aggregator: "
                                    f"{code.name}: {exc.details()}") from None

    # -- the loop --------------------------------------------------------------------------

    def run(self, channel: grpc.Channel) -> int:
        stub = wire.aggregator_stub(channel)
        info = wire.JoinInfo(len(self.train_cases), len(self.val_cases), self.device.type)
        reply = wire.decode_join_response(self._call(
            "join", stub.Join, wire.join_request(self._env(stage="joining"), info),
            timeout=RPC_TIMEOUT_S))
        _LOGGER.info("site %s joined federation %s: %d round(s), %d site(s) expected", self.site,
                     self.cfg.federation.name, reply.total_rounds, reply.expected_sites)
        while True:
            task = wire.decode_task_response(self._call(
                "get task", stub.GetTask,
                wire.task_request(self._env(), self.last_completed, TASK_WAIT_MS),
                timeout=TASK_WAIT_MS / 1000 + 30))
            if task.stage == "done":
                if task.failed:
                    _LOGGER.error("site %s: federation failed: %s", self.site, task.message)
                    return RoundAborted.exit_code
                _LOGGER.info("site %s: %s", self.site, task.message or "federation complete")
                return 0
            if task.stage == "result":
                self._on_result(stub, task)
            elif task.stage == "training" and task.model_sha256 and not task.submitted:
                self._on_training(stub, task)

    def _on_training(self, stub, task: wire.Task) -> None:
        from node.model import load_numpy_state, state_to_numpy
        from node.update import model_delta

        r = task.round
        if self.global_sha != task.model_sha256:
            payload = wire.receive_model(self._call(
                "fetch model", lambda: list(stub.FetchModel(
                    wire.fetch_model_request(self._env(r, "training")), timeout=STREAM_TIMEOUT_S))))
            if payload.info.sha256 != task.model_sha256:
                raise ProtocolError(f"site {self.site}: round {r}: fetched global model does "
                                    f"not match the announced SHA-256")
            self.global_model = wire.unpack_tensors(payload)
            self.global_sha = payload.info.sha256
            _LOGGER.info("site %s: round %d stage training: global model fetched (%.1f MB)",
                         self.site, r, payload.info.total_bytes / 1e6)
        load_numpy_state(self.model, self.global_model)
        steps = task.local_steps or self.cfg.training.local_steps
        _LOGGER.info("site %s: round %d stage training: %d local step(s)", self.site, r, steps)
        every = max(1, steps // 4)

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                _LOGGER.info("site %s: round %d step %d/%d loss %.4f", self.site, r, step, steps,
                             loss)

        res = self.trainer.train_round(r, on_step=on_step)
        self.last_train = res
        delta = model_delta(state_to_numpy(self.model), self.global_model)
        for f in self.filters:
            delta = f(r, delta)
        payload = self.protector.protect(r, delta, res.num_samples)
        meta = wire.UpdateMetadata(res.num_samples, res.steps, res.mean_loss, self.global_sha)
        reply = wire.decode_submit_response(self._call(
            "submit update", stub.SubmitUpdate,
            wire.update_stream(self._env(r, "training"), meta, payload), timeout=STREAM_TIMEOUT_S))
        _LOGGER.info("site %s: round %d stage training: update submitted (%.1f MB, loss %.4f, "
                     "%.1f s)%s", self.site, r, payload.info.total_bytes / 1e6, res.mean_loss,
                     res.seconds, " (duplicate, counted once)" if reply.duplicate else "")

    def _on_result(self, stub, task: wire.Task) -> None:
        from node.model import load_numpy_state
        from node.train import evaluate

        r = task.round
        payload = wire.receive_model(self._call(
            "fetch result", lambda: list(stub.FetchResult(
                wire.fetch_result_request(self._env(r, "result")), timeout=STREAM_TIMEOUT_S))))
        if payload.info.sha256 != task.model_sha256:
            raise ProtocolError(f"site {self.site}: round {r}: fetched result does not match "
                                f"the announced SHA-256")
        self.global_model = self.protector.recover(r, payload)
        self.global_sha = wire.payload_sha256(self.global_model)
        load_numpy_state(self.model, self.global_model)
        t0 = time.perf_counter()
        if self.val_cases:
            scores = evaluate(self.model, self.val_cases, self.cfg.evaluation,
                              labels=self.cfg.data.labels, device=self.device)
        else:
            scores = {}
        eval_s = time.perf_counter() - t0
        dice = {k: scores.get(k, float("nan")) for k in ("wt", "tc", "et", "mean")}
        hd95 = {k: _float(scores.get(f"hd95_{k}")) for k in ("wt", "tc", "et", "mean")}
        last = getattr(self, "last_train", None)
        report = wire.MetricsReport(
            dice=dice, hd95=hd95, num_val_cases=len(self.val_cases),
            train_loss=last.mean_loss if last else float("nan"),
            train_seconds=last.seconds if last else 0.0, eval_seconds=eval_s)
        self._call("report metrics", stub.ReportMetrics,
                   wire.metrics_request(self._env(r, "result"), report), timeout=RPC_TIMEOUT_S)
        _LOGGER.info("site %s: round %d result: Dice WT %.3f TC %.3f ET %.3f mean %.3f "
                     "(%d case(s), %.1f s)", self.site, r, dice["wt"], dice["tc"], dice["et"],
                     dice["mean"], len(self.val_cases), eval_s)
        self.last_completed = r


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _site_number(site: str) -> int:
    digits = "".join(ch for ch in site if ch.isdigit())
    return int(digits[-6:]) if digits else sum(site.encode())


def open_channel(cfg: Config, *, insecure: bool = False) -> grpc.Channel:
    """A channel to ``node.aggregator``: mutual TLS from ``[tls]``, or plaintext if ``insecure``.

    The aggregator's certificate must chain to ``tls.ca_cert`` and name ``tls.server_name``
    (default: the host part of ``node.aggregator``).

    Raises:
        FedbratsError: TLS material missing or unreadable (names the field and file).
    """
    from crypto.pki import read_pem

    opts = grpc_options(cfg.aggregator.max_message_mb)
    if insecure:
        return grpc.insecure_channel(cfg.node.aggregator, options=opts)
    t = cfg.tls
    missing = [f"tls.{n}" for n in ("ca_cert", "cert", "key") if not getattr(t, n)]
    if missing:
        raise FedbratsError(f"site {cfg.node.site_id}: {', '.join(missing)} not set; use the kit "
                            f"from `fedbrats provision` or pass --insecure for local debugging")
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_pem(t.ca_cert, "tls.ca_cert"),
        private_key=read_pem(t.key, "tls.key"),
        certificate_chain=read_pem(t.cert, "tls.cert"))
    if t.server_name:
        opts.append(("grpc.ssl_target_name_override", t.server_name))
    return grpc.secure_channel(cfg.node.aggregator, creds, options=opts)


def serve(cfg: Config, *, insecure: bool = False) -> int:
    """Run the node daemon until the federation ends.

    Args:
        cfg: the site's configuration; ``[tls]`` must be set unless ``insecure``.
        insecure: plaintext gRPC without authentication (prints a warning).

    Returns:
        The process exit code (0 on success).

    Raises:
        FedbratsError: preflight failure (DataError), unreachable aggregator, refused request,
            missing TLS material.
    """
    if insecure:
        from aggregator.server import INSECURE_WARNING

        _LOGGER.warning(INSECURE_WARNING)
    else:
        open_channel(cfg).close()  # fail on missing TLS material before the preflight
    node = Node(cfg)
    with open_channel(cfg, insecure=insecure) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=cfg.node.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise AggregatorUnreachable(
                f"site {node.site}: aggregator {cfg.node.aggregator} unreachable for "
                f"{cfg.node.connect_timeout_s:g} s") from None
        return node.run(channel)
