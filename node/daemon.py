"""The site node daemon: ``fedbrats node --config site-1.toml``.

Preflight (every case checked before round 1), then join the aggregator and follow its tasks
(:class:`SiteSession`):

* ``training`` (plaintext mode) or ``masked_input`` (mask mode), round r: fetch the global
  model if ours is not the one the round trains from (SHA-256 checked), train ``local_steps``
  steps, form Δ = w_local − w_global, apply the update filters (:mod:`node.update`), protect the
  update — plaintext, or quantised and masked (:mod:`node.secagg_client`) — and stream it up;
* ``advertise_keys`` / ``share_keys`` / ``unmask`` (mask mode): the secure-aggregation steps;
* ``result``, round r: fetch the new global model, evaluate it on this site's held-out cases and
  report Dice/HD95 (only metrics travel);
* ``done``: leave; exit 0, or :attr:`RoundAborted.exit_code` if the federation failed.

The local work (training, evaluation) is a :class:`LocalWorker`; :class:`Node` is the real one
(MONAI SegResNet on the site's BraTS cases, CUDA when present, else the CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from fedbrats.transport import grpc_options
from fedbrats import wire
from fedbrats.config import Config
from fedbrats.errors import ConfigError, FedbratsError, ProtocolError, RoundAborted
from node.accounting import PrivacyBudgetExceeded

_LOGGER = logging.getLogger(__name__)

#: Long-poll length for GetTask, ms.
TASK_WAIT_MS = 20_000
#: Per-RPC deadline for unary calls other than the long poll, s.
RPC_TIMEOUT_S = 60.0
#: Deadline for streaming a model or an update, s.
STREAM_TIMEOUT_S = 600.0


class OutOfStep(ProtocolError):
    """The aggregator refused a request as stale or for the wrong stage: resynchronise."""


class NotJoined(ProtocolError):
    """The aggregator does not know this site (e.g. it restarted): join again."""


class AggregatorUnreachable(FedbratsError):
    """The aggregator could not be reached within ``node.connect_timeout_s``."""

    exit_code = 7


@dataclass(frozen=True)
class LocalUpdate:
    """What local training produced: Δ = w_local − w_global (name -> float32) and its stats."""

    delta: dict[str, np.ndarray]
    num_samples: int
    steps: int
    loss: float
    seconds: float


class LocalWorker(Protocol):
    """The site's local work, behind the protocol."""

    num_train: int
    num_val: int
    device: str

    def train(self, round: int, global_model: dict[str, np.ndarray]) -> LocalUpdate: ...

    def evaluate(self, round: int, global_model: dict[str, np.ndarray]) -> dict: ...


def _site_cases(cfg: Config):
    from node import data

    site = cfg.node.site_id
    root = Path(cfg.data.root).expanduser()
    if not cfg.data.root:
        raise ConfigError(f"site {site}", ["data.root is empty; point it at the site's "
                                           "BraTS/FeTS folder"])
    if not root.is_dir():
        raise ConfigError(f"site {site}", [f"data.root: {root} is not a directory"])
    part = Path(cfg.data.partitioning).expanduser() if cfg.data.partitioning else None
    found: list = []
    sites = data.discover_sites(root, partitioning=part, site=site, problems_out=found)
    cases = sites.get(site, [])
    # Discovery and preflight problems are reported together, in one error.
    data.preflight(cases, labels=cfg.data.labels, known_problems=found)
    if not cases:
        raise ConfigError(f"site {site}", [f"data.root: no cases for this site under {root}"])
    train, val = data.split_cases(cases, val_fraction=cfg.data.val_fraction,
                                  seed=cfg.federation.seed)
    if not train:
        raise FedbratsError(f"site {site}: no training cases after the validation split "
                            f"({len(cases)} case(s), data.val_fraction {cfg.data.val_fraction})")
    return train, val


class Node:
    """The real :class:`LocalWorker`: SegResNet training and validation on the site's cases."""

    def __init__(self, cfg: Config):
        from node import data
        from node.model import build_model, select_device
        from node.train import LocalTrainer, configure_torch, seed_everything

        self.cfg = cfg
        self.site = cfg.node.site_id
        configure_torch(cfg.training)
        self._device = select_device(cfg.training.device)
        self.device = self._device.type
        t0 = time.perf_counter()
        train, val = _site_cases(cfg)
        self.train_cases = [data.load_case(c) for c in train]
        self.val_cases = [data.load_case(c) for c in val]
        self.num_train, self.num_val = len(self.train_cases), len(self.val_cases)
        _LOGGER.info("site %s: preflight passed; %d training and %d validation case(s) loaded "
                     "in %.1f s; device %s", self.site, len(train), len(val),
                     time.perf_counter() - t0, self._device)
        seed = cfg.federation.seed * 1000 + _site_number(self.site)
        seed_everything(seed)
        self.model = build_model(cfg.model)
        from node.model import state_to_numpy

        self.model_signature = wire.model_signature(state_to_numpy(self.model))
        self.state_dir = Path(cfg.node.state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        from node.accounting import SAMPLE_STATE_FILE

        # DP-SGD (dp.mode has "dp-sgd"): one accountant over all rounds, persisted in the
        # site's state folder so that a restarted node continues its epsilon (case K04).
        self.trainer = LocalTrainer(self.model, self.train_cases, cfg.training, cfg.data.labels,
                                    self._device, seed, dp_cfg=cfg.dp,
                                    planned_rounds=cfg.federation.rounds,
                                    privacy_state=self.state_dir / SAMPLE_STATE_FILE,
                                    site=self.site)
        if self.trainer.dp_enabled:
            _LOGGER.info("site %s: DP-SGD on: noise multiplier %.3f, max grad norm %g, Poisson "
                         "sampling rate %.3f, per-sample gradients via %s", self.site,
                         self.trainer.noise_multiplier, cfg.dp.max_grad_norm,
                         self.trainer.sample_rate, self.trainer.grad_sample_mode)

    def train(self, round: int, global_model: dict[str, np.ndarray]) -> LocalUpdate:
        from node.model import load_numpy_state, state_to_numpy
        from node.update import model_delta

        load_numpy_state(self.model, global_model)
        steps = self.cfg.training.local_steps
        every = max(1, steps // 4)

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                _LOGGER.info("site %s: round %d step %d/%d loss %.4f", self.site, round, step,
                             steps, loss)

        res = self.trainer.train_round(round, on_step=on_step)
        delta = model_delta(state_to_numpy(self.model), global_model)
        return LocalUpdate(delta, res.num_samples, res.steps, res.mean_loss, res.seconds)

    def privacy_spent(self) -> tuple[float, float]:
        """Sample-level (epsilon, delta) of DP-SGD so far; (0, 0) when DP-SGD is off."""
        return self.trainer.privacy_spent() if self.trainer.dp_enabled else (0.0, 0.0)

    def save_model(self, path: Path, global_model: dict[str, np.ndarray], round: int) -> None:
        """Write the global model as a ``fedbrats-model/1`` file (ckks mode: only sites have it)."""
        from node.model import save_model_file

        save_model_file(path, global_model, model_cfg=self.cfg.model, labels=self.cfg.data.labels,
                        round=round, federation=self.cfg.federation.name)

    def evaluate(self, round: int, global_model: dict[str, np.ndarray]) -> dict:
        from node.model import load_numpy_state
        from node.train import evaluate

        load_numpy_state(self.model, global_model)
        if not self.val_cases:
            return {}
        return evaluate(self.model, self.val_cases, self.cfg.evaluation,
                        labels=self.cfg.data.labels, device=self._device)


class SiteSession:
    """One site's participation in a federation: the protocol loop over gRPC.

    Args:
        cfg: the site's configuration.
        worker: local training and evaluation.
        masking: the site's :class:`~node.secagg_client.MaskingClient` (mask mode), else None.
    """

    def __init__(self, cfg: Config, worker: LocalWorker, masking=None):
        from node.dp import make_dp_filters
        from node.update import make_protector

        self.cfg = cfg
        self.site = cfg.node.site_id
        if not self.site:
            raise FedbratsError("node.site_id is empty: say which site this node is")
        self.worker = worker
        self.mode = cfg.federation.secure_aggregation
        self.masking = masking
        if self.mode == "mask" and masking is None:
            raise FedbratsError(f"site {self.site}: mask mode needs the site's identity keys")
        state_dir = Path(cfg.node.state_dir).expanduser()
        modes = tuple(cfg.dp.mode)
        self.filters = make_dp_filters(cfg, state_dir=state_dir, site=self.site) if modes else []
        #: Site-level DP bounds each site's contribution, so sites are weighted equally
        #: (DP-FedAvg, McMahan et al. ICLR 2018): a weight would scale the sensitivity.
        self.equal_weights = "site-local" in modes or "site-distributed" in modes
        self.skellam = None  # mask + site-distributed: integer noise after quantisation
        self.state_dir = state_dir
        self.protector = make_protector(cfg) if self.mode == "none" else None
        self.ckks_ctx = None
        if self.mode == "ckks":
            from aggregator.ckks import load_federation_context

            self.ckks_ctx = load_federation_context(cfg, secret=True)
        self.global_model: dict | None = None
        self.global_sha = b""
        self.last_completed = 0
        self.last_update: LocalUpdate | None = None
        self.clipped = 0
        self.vanished = False

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
                cls = {grpc.StatusCode.FAILED_PRECONDITION: OutOfStep,
                       grpc.StatusCode.NOT_FOUND: NotJoined}.get(code, ProtocolError)
                raise cls(f"site {self.site}: {what} refused by the aggregator: "
                          f"{code.name}: {exc.details()}") from None

    # -- the loop --------------------------------------------------------------------------

    def run(self, channel: grpc.Channel) -> int:
        """Follow the aggregator's tasks until the federation ends; returns the exit code."""
        stub = wire.aggregator_stub(channel)
        info = wire.JoinInfo(self.worker.num_train, self.worker.num_val, self.worker.device,
                             self.mode, getattr(self.worker, "model_signature", b""))
        if self.mode == "mask" and info.num_train_samples > self.cfg.secagg.max_weight:
            raise FedbratsError(f"site {self.site}: {info.num_train_samples} training cases "
                                f"exceed secagg.max_weight = {self.cfg.secagg.max_weight}")

        def join() -> None:
            reply = wire.decode_join_response(self._call(
                "join", stub.Join, wire.join_request(self._env(stage="joining"), info),
                timeout=RPC_TIMEOUT_S))
            _LOGGER.info("site %s joined federation %s: %d round(s), %d site(s) expected, "
                         "secure aggregation %s", self.site, self.cfg.federation.name,
                         reply.total_rounds, reply.expected_sites, self.mode)

        join()
        out_of_step = 0
        handlers = {
            "training": self._on_update, "masked_input": self._on_update,
            "advertise_keys": self._on_advertise, "share_keys": self._on_share_keys,
            "unmask": self._on_unmask, "result": self._on_result,
        }
        while True:
            try:
                task = wire.decode_task_response(self._call(
                    "get task", stub.GetTask,
                    wire.task_request(self._env(), self.last_completed, TASK_WAIT_MS),
                    timeout=TASK_WAIT_MS / 1000 + 30))
            except NotJoined:
                _LOGGER.warning("site %s: the aggregator does not know this site (did it "
                                "restart?); joining again", self.site)
                join()
                continue
            if task.stage == "done":
                if task.failed:
                    _LOGGER.error("site %s: federation failed: %s", self.site, task.message)
                    return RoundAborted.exit_code
                _LOGGER.info("site %s: %s", self.site, task.message or "federation complete")
                return 0
            actionable = task.stage == "result" or (task.model_sha256 and not task.submitted)
            if task.stage in handlers and actionable:
                if task.stage == self.cfg.node.drop_at:
                    # Leave without a word to the aggregator, as a crashed site would.
                    _LOGGER.warning("site %s: fault injection: vanishing at round %d stage %s "
                                    "(node.drop_at)", self.site, task.round, task.stage)
                    self.vanished = True
                    return 0
                try:
                    handlers[task.stage](stub, task)
                    out_of_step = 0
                except PrivacyBudgetExceeded as exc:
                    _LOGGER.error("site %s: leaving the federation: %s", self.site, exc)
                    self._withdraw(stub, task, f"privacy budget: {exc}")
                    return PrivacyBudgetExceeded.exit_code
                except (OutOfStep, NotJoined) as exc:
                    # The round moved on (a deadline passed, or the aggregator restarted and
                    # resumed from its last checkpoint): ask again what to do.  Round secrets
                    # are never reused: a retried round starts with fresh keys.
                    out_of_step += 1
                    if out_of_step > 10:
                        raise
                    _LOGGER.warning("site %s: %s; resynchronising", self.site, exc)
                except AggregatorUnreachable:
                    raise
                except FedbratsError as exc:
                    # A local refusal or failure (non-finite update, unfit noise, NaN loss):
                    # tell the aggregator so the round does not wait for its deadline.
                    self._withdraw(stub, task, str(exc))
                    raise

    def _withdraw(self, stub, task: wire.Task, reason: str) -> None:
        """Best effort: tell the aggregator this site leaves round ``task.round`` and why."""
        try:
            reply = stub.Withdraw(wire.withdraw_request(self._env(task.round, task.stage), reason),
                                  timeout=RPC_TIMEOUT_S)
            _LOGGER.warning("site %s: withdrew from round %d (%s)", self.site, task.round,
                            "the round no longer waits for it" if reply.accepted
                            else "the aggregator had nothing to withdraw from")
        except grpc.RpcError as exc:
            _LOGGER.warning("site %s: could not tell the aggregator that it withdraws from round "
                            "%d (%s); the round waits for its deadline", self.site, task.round,
                            exc.code().name)

    def _ensure_global(self, stub, task: wire.Task) -> None:
        r = task.round
        if self.global_sha == task.model_sha256:
            return
        payload = wire.receive_model(self._call(
            "fetch model", lambda: list(stub.FetchModel(
                wire.fetch_model_request(self._env(r, task.stage)), timeout=STREAM_TIMEOUT_S))))
        if payload.info.sha256 != task.model_sha256:
            raise ProtocolError(f"site {self.site}: round {r}: fetched global model does not "
                                f"match the announced SHA-256")
        self.global_model = wire.unpack_tensors(payload)
        self.global_sha = payload.info.sha256
        _LOGGER.info("site %s: round %d: global model fetched (%.1f MB)", self.site, r,
                     payload.info.total_bytes / 1e6)

    def _on_advertise(self, stub, task: wire.Task) -> None:
        adv = self.masking.advertise(task.round)
        self._call("advertise keys", stub.AdvertiseKeys,
                   wire.advertise_keys_request(self._env(task.round, "advertise_keys"), adv),
                   timeout=RPC_TIMEOUT_S)
        _LOGGER.info("site %s: round %d stage advertise_keys: signed keys advertised",
                     self.site, task.round)

    def _on_share_keys(self, stub, task: wire.Task) -> None:
        from fedbrats.masking import Advertisement

        r = task.round
        adverts, neighbours, threshold, seed = wire.decode_get_keys_response(self._call(
            "get keys", stub.GetKeys, wire.get_keys_request(self._env(r, "share_keys")),
            timeout=RPC_TIMEOUT_S), Advertisement)
        bundles = self.masking.make_shares(r, adverts, neighbours, threshold, seed)
        self._call("share keys", stub.ShareKeys,
                   wire.share_keys_request(self._env(r, "share_keys"), bundles),
                   timeout=RPC_TIMEOUT_S)
        _LOGGER.info("site %s: round %d stage share_keys: %d advertisement(s) verified, "
                     "encrypted shares sent to %d neighbour(s)", self.site, r, len(adverts),
                     len(bundles))

    def _on_update(self, stub, task: wire.Task) -> None:
        r = task.round
        if self.mode == "mask":
            from fedbrats.masking import EncryptedShares

            bundles, senders = wire.decode_get_shares_response(self._call(
                "get shares", stub.GetShares, wire.get_shares_request(self._env(r, task.stage)),
                timeout=RPC_TIMEOUT_S), EncryptedShares)
            self.masking.receive_shares(r, bundles, senders)
        self._ensure_global(stub, task)
        _LOGGER.info("site %s: round %d stage %s: %d local step(s)", self.site, r, task.stage,
                     task.local_steps or self.cfg.training.local_steps)
        upd = self.worker.train(r, self.global_model)
        self.last_update = upd
        delta = upd.delta
        if self.mode == "ckks":
            # Clip before the DP filters: clipping a noised update would truncate its noise.
            delta = self._ckks_clip(r, delta)
        for f in self.filters:
            delta = f(r, delta)
        weight = 1 if self.equal_weights else upd.num_samples
        if self.mode == "mask":
            noiser = self._skellam(delta) if "site-distributed" in self.cfg.dp.mode else None
            tensors, self.clipped = self.masking.mask(r, delta, weight, noiser=noiser)
            payload = wire.pack_tensors(tensors, scheme="mask")
            weight = 0  # the weight travels masked, inside the payload
            if self.clipped:
                _LOGGER.warning("site %s: round %d: %d update value(s) clipped to ±%g before "
                                "quantisation", self.site, r, self.clipped, self.cfg.secagg.clip)
        elif self.mode == "ckks":
            payload = self._encrypt(r, delta, weight)
            weight = 0  # the weight travels encrypted, inside the payload
        else:
            payload = self.protector.protect(r, delta, weight)
        meta = wire.UpdateMetadata(weight, upd.steps, upd.loss, self.global_sha)
        reply = wire.decode_submit_response(self._call(
            "submit update", lambda: stub.SubmitUpdate(
                wire.update_stream(self._env(r, task.stage), meta, payload),
                timeout=STREAM_TIMEOUT_S)))
        _LOGGER.info("site %s: round %d stage %s: %s update submitted (%.1f MB, loss %.4f, "
                     "%.1f s)%s", self.site, r, task.stage, payload.info.scheme,
                     payload.info.total_bytes / 1e6, upd.loss, upd.seconds,
                     " (duplicate, counted once)" if reply.duplicate else "")

    def _skellam(self, delta: dict[str, np.ndarray]):
        """The site's Skellam noiser (mask mode, ``site-distributed``), built on first use."""
        if self.skellam is None:
            from fedbrats.masking import quant_params
            from node.accounting import SITE_STATE_FILE
            from node.dp import SkellamNoiser

            dim = sum(int(v.size) for v in delta.values())
            dp, params = self.cfg.dp, quant_params(self.cfg, dim=dim)
            self.skellam = SkellamNoiser(
                dp.site_clip, dp.site_noise_multiplier, self.cfg.federation.min_sites,
                clip=params.clip, bits=params.bits, dim=dim,
                state_path=self.state_dir / SITE_STATE_FILE, site=self.site, delta=dp.site_delta)
        return self.skellam

    def privacy(self) -> dict[str, float]:
        """(ε, δ) spent so far: sample-level (DP-SGD) and site-level (update noise)."""
        eps_s, delta_s = (self.worker.privacy_spent() if hasattr(self.worker, "privacy_spent")
                          else (0.0, 0.0))
        eps_u, delta_u = 0.0, 0.0
        for f in [*self.filters, self.skellam]:
            acc = getattr(f, "accountant", None)
            if acc is not None and getattr(acc, "delta", None):
                eps_u, delta_u = float(acc.epsilon()), float(acc.delta)
        return {"epsilon_sample": eps_s, "delta_sample": delta_s, "epsilon_site": eps_u,
                "delta_site": delta_u}

    def _ckks_clip(self, r: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ckks mode: clip every coordinate of Δ to ±``ckks.max_abs_value`` (counted, logged).

        Runs before the DP filters, so the noise they add is never truncated.
        """
        lim = self.cfg.ckks.max_abs_value
        out, clipped = {}, 0
        for k, v in delta.items():
            a = np.asarray(v)
            clipped += int(np.count_nonzero(np.abs(a) > lim))
            out[k] = np.clip(a, -lim, lim)
        self.clipped = clipped
        if clipped:
            _LOGGER.warning("site %s: round %d: %d update value(s) clipped to ±%g before "
                            "encryption", self.site, r, clipped, lim)
        return out

    def _encrypt(self, r: int, delta: dict[str, np.ndarray], weight: int) -> wire.Payload:
        """ckks mode: encrypt (weight·Δ, weight) in chunks; Δ was clipped by :meth:`_ckks_clip`.

        Without DP filters every value is within ±``ckks.max_abs_value`` and larger ones are
        refused; after a noise filter the values may exceed it by the noise, so only what the
        parameters cannot encode is refused.
        """
        from aggregator.ckks import chunks_to_tensors
        from crypto import ckks
        from crypto.errors import CryptoInputError

        if weight > self.cfg.ckks.max_weight:
            raise FedbratsError(f"site {self.site}: {weight} training cases exceed "
                                f"ckks.max_weight = {self.cfg.ckks.max_weight}")
        flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in delta.values()])
        if not np.all(np.isfinite(flat)):
            raise FedbratsError(f"site {self.site}: round {r}: refusing to encrypt an update "
                                f"with {int(np.sum(~np.isfinite(flat)))} non-finite value(s)")
        bound = None if self.filters else self.cfg.ckks.max_abs_value
        try:
            chunks = ckks.encrypt_update(flat * weight, float(weight), self.ckks_ctx,
                                         max_abs_value=bound)
        except (CryptoInputError, FedbratsError) as exc:
            raise FedbratsError(f"site {self.site}: round {r}: {exc}") from None
        return wire.pack_tensors(chunks_to_tensors(chunks), scheme="ckks")

    def _decrypt_result(self, r: int, payload: wire.Payload) -> dict[str, np.ndarray]:
        """ckks mode: new global = global + Σ wᵢΔᵢ / Σ wᵢ, decrypted here at the site."""
        from aggregator.ckks import tensors_to_chunks
        from crypto import ckks
        from crypto.errors import CryptoError, CryptoInputError

        if self.global_model is None:
            raise FedbratsError(f"site {self.site}: round {r}: no global model to apply the "
                                f"aggregate to (ckks mode cannot recover a lost model)")
        n = sum(int(v.size) for v in self.global_model.values())
        try:
            total, weight = ckks.decrypt_aggregate(
                tensors_to_chunks(wire.unpack_tensors(payload), f"round {r} aggregate"),
                self.ckks_ctx, n)
        except (CryptoError, CryptoInputError) as exc:
            raise ProtocolError(f"site {self.site}: round {r}: the aggregate does not decrypt "
                                f"under this federation's context ({exc})") from None
        mean = total / weight
        out, off = {}, 0
        for k, g in self.global_model.items():
            out[k] = (g.astype(np.float64) + mean[off:off + g.size].reshape(g.shape)).astype(g.dtype)
            off += g.size
        return out

    def _on_unmask(self, stub, task: wire.Task) -> None:
        r = task.round
        survivors, dropped = wire.decode_get_survivors_response(self._call(
            "get survivors", stub.GetSurvivors, wire.get_survivors_request(self._env(r, "unmask")),
            timeout=RPC_TIMEOUT_S))
        shares = self.masking.reveal(r, survivors, dropped)
        self._call("unmask", stub.Unmask, wire.unmask_request(self._env(r, "unmask"), shares),
                   timeout=RPC_TIMEOUT_S)
        _LOGGER.info("site %s: round %d stage unmask: %d survivor(s), %d dropped; %d share(s) "
                     "revealed", self.site, r, len(survivors), len(dropped), len(shares))

    def _on_result(self, stub, task: wire.Task) -> None:
        r = task.round
        payload = wire.receive_model(self._call(
            "fetch result", lambda: list(stub.FetchResult(
                wire.fetch_result_request(self._env(r, "result")), timeout=STREAM_TIMEOUT_S))))
        if payload.info.sha256 != task.model_sha256:
            raise ProtocolError(f"site {self.site}: round {r}: fetched result does not match "
                                f"the announced SHA-256")
        if payload.info.scheme == "ckks":
            self.global_model = self._decrypt_result(r, payload)
        else:
            self.global_model = wire.unpack_tensors(payload)
        self.global_sha = payload.info.sha256
        if r == task.total_rounds and self.mode == "ckks" and hasattr(self.worker, "save_model"):
            path = Path(self.cfg.node.state_dir).expanduser() / "final_model.pt"
            self.worker.save_model(path, self.global_model, r)
            _LOGGER.info("site %s: final model written to %s", self.site, path)
        t0 = time.perf_counter()
        scores = self.worker.evaluate(r, self.global_model)
        eval_s = time.perf_counter() - t0
        dice = {k: _float(scores.get(k)) for k in ("wt", "tc", "et", "mean")}
        hd95 = {k: _float(scores.get(f"hd95_{k}")) for k in ("wt", "tc", "et", "mean")}
        if self.mode == "ckks":
            # Metrics computed from a decrypted model go back rounded, never exact
            # (Li & Micciancio, EUROCRYPT 2021; see crypto.ckks).
            dice = {k: round(v, 3) for k, v in dice.items()}
            hd95 = {k: round(v, 1) for k, v in hd95.items()}
        last = self.last_update
        priv = self.privacy()
        report = wire.MetricsReport(
            dice=dice, hd95=hd95, num_val_cases=self.worker.num_val,
            train_loss=last.loss if last else float("nan"),
            train_seconds=last.seconds if last else 0.0, eval_seconds=eval_s,
            clipped_values=self.clipped, **priv)
        self._call("report metrics", stub.ReportMetrics,
                   wire.metrics_request(self._env(r, "result"), report), timeout=RPC_TIMEOUT_S)
        _LOGGER.info("site %s: round %d result: Dice WT %.3f TC %.3f ET %.3f mean %.3f "
                     "(%d case(s), %.1f s)", self.site, r, dice["wt"], dice["tc"], dice["et"],
                     dice["mean"], self.worker.num_val, eval_s)
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
    from crypto.pki import check_key_matches_cert, read_pem

    opts = grpc_options(cfg.aggregator.max_message_mb)
    if insecure:
        return grpc.insecure_channel(cfg.node.aggregator, options=opts)
    t = cfg.tls
    missing = [f"tls.{n}" for n in ("ca_cert", "cert", "key") if not getattr(t, n)]
    if missing:
        raise ConfigError(f"site {cfg.node.site_id}", [
            f"{', '.join(missing)} not set; use the kit from `fedbrats provision`, or pass "
            f"--insecure for local debugging"])
    key, cert = read_pem(t.key, "tls.key", private=True), read_pem(t.cert, "tls.cert")
    check_key_matches_cert(cert, key, f"site {cfg.node.site_id}")
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_pem(t.ca_cert, "tls.ca_cert"), private_key=key,
        certificate_chain=cert)
    if t.server_name:
        opts.append(("grpc.ssl_target_name_override", t.server_name))
    return grpc.secure_channel(cfg.node.aggregator, creds, options=opts)


def make_masking_client(cfg: Config):
    """The site's :class:`~node.secagg_client.MaskingClient` from its provisioned keys.

    Raises:
        FedbratsError: ``node.identity_key`` or ``node.identities_dir`` unset or unreadable.
    """
    from node.secagg_client import MaskingClient, load_identities, load_identity_key

    missing = [f"node.{n}" for n in ("identity_key", "identities_dir") if not getattr(cfg.node, n)]
    if missing:
        raise ConfigError(f"site {cfg.node.site_id}", [
            f"secure_aggregation = 'mask' needs {' and '.join(missing)} (from the site kit of "
            f"`fedbrats provision`)"])
    return MaskingClient(cfg, cfg.node.site_id, load_identity_key(cfg.node.identity_key),
                         load_identities(cfg.node.identities_dir))


def serve(cfg: Config, *, insecure: bool = False) -> int:
    """Run the node daemon until the federation ends.

    Args:
        cfg: the site's configuration; ``[tls]`` must be set unless ``insecure``.
        insecure: plaintext gRPC without authentication (prints a warning).

    Returns:
        The process exit code (0 on success).

    Raises:
        FedbratsError: preflight failure (DataError), unreachable aggregator, refused request,
            missing TLS material or identity keys.
    """
    if not cfg.node.site_id:
        raise ConfigError("node", ["node.site_id is empty: say which site this node is"])
    if insecure:
        from fedbrats.transport import INSECURE_WARNING

        _LOGGER.warning(INSECURE_WARNING)
    else:
        open_channel(cfg).close()  # fail on missing TLS material before the preflight
    masking = make_masking_client(cfg) if cfg.federation.secure_aggregation == "mask" else None
    if cfg.federation.secure_aggregation == "ckks":
        from aggregator.ckks import check_dp_noise_fits, load_federation_context

        check_dp_noise_fits(cfg)  # noisy updates must fit the parameters: refuse before round 1
        load_federation_context(cfg, secret=True)  # fail on a bad context before the preflight
    session = SiteSession(cfg, Node(cfg), masking)
    with open_channel(cfg, insecure=insecure) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=cfg.node.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise AggregatorUnreachable(
                f"site {session.site}: aggregator {cfg.node.aggregator} unreachable for "
                f"{cfg.node.connect_timeout_s:g} s") from None
        return session.run(channel)
