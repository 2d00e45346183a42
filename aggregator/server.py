"""The aggregator daemon: a thin gRPC servicer over :mod:`aggregator.state`.

:class:`AggregatorCore` owns the round state, the global model and the pluggable sum, behind one
lock; :class:`Servicer` turns RPCs into core calls and core errors into gRPC status codes:

=====================  =========================================================
error                  gRPC status
=====================  =========================================================
ProtocolError          FAILED_PRECONDITION (wrong federation, stale round, stage)
Unauthenticated        UNAUTHENTICATED (no client certificate)
NotAuthorized          PERMISSION_DENIED (certificate names another site, or revoked)
UnknownSite            NOT_FOUND (the site has not joined: it should join again)
UpdateRejected         INVALID_ARGUMENT (names site and tensor)
WireError              DATA_LOSS (chunk order, size or SHA-256)
=====================  =========================================================

Outputs under ``aggregator.out_dir``: ``checkpoints/round-NNNN.pt`` (global model after each
round), ``final_model.pt``, ``metrics.jsonl`` (one line per round and site), ``events.jsonl``
(round starts and ends) and ``aggregator.port`` (the bound port, written once listening).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aggregator import state as sm
from aggregator import secagg as sa
from aggregator.aggregate import UpdateRejected, make_secure_sum
from fedbrats import masking, wire
from fedbrats.transport import INSECURE_WARNING, grpc_options
from fedbrats.config import Config, secagg_threshold
from fedbrats.errors import ConfigError, FedbratsError, ProtocolError, RoundAborted, WireError

_LOGGER = logging.getLogger(__name__)

#: Longest a GetTask long-poll is held, ms.
MAX_WAIT_MS = 30_000
#: After the federation ends, how long to keep serving so every site can learn it ended, s.
LINGER_S = 15.0


RESUME_FILE = "resume.json"


class UnknownSite(FedbratsError):
    """A request names a site that has not joined this federation."""


class NotAuthorized(FedbratsError):
    """The peer's certificate may not act as the site a request names (or is revoked)."""


class Unauthenticated(FedbratsError):
    """The peer presented no client certificate."""


@dataclass
class _Site:
    num_train_samples: int
    num_val_samples: int
    device: str
    told_done: bool = False


class AggregatorCore:
    """The aggregator's logic and data, thread-safe, without gRPC.

    Args:
        cfg: the aggregator's configuration.
        initial_model: name -> float32 array, the round-1 global model.
        clock: monotonic time source in seconds (injected for tests).
        completed_round: resume after this many completed rounds (``initial_model`` is then
            that round's checkpoint; see :func:`load_resume_point`).
        save_model: ``save_model(path, tensors, round)`` writes a checkpoint; default writes a
            ``fedbrats-model/1`` file with :func:`node.model.save_model_file`.
    """

    def __init__(self, cfg: Config, initial_model: dict[str, np.ndarray], *,
                 clock=time.monotonic, save_model=None, completed_round: int = 0) -> None:
        fed, ag = cfg.federation, cfg.aggregator
        self.cfg = cfg
        self.federation_id = fed.name
        self.clock = clock
        self.params = sm.Params(
            total_rounds=fed.rounds, expected_sites=fed.sites, min_sites=fed.min_sites,
            join_timeout_s=ag.join_timeout_s, round_timeout_s=ag.round_timeout_s,
            metrics_timeout_s=ag.metrics_timeout_s, mode=fed.secure_aggregation,
            threshold=secagg_threshold(cfg) if fed.secure_aggregation == "mask" else 0,
            stage_timeout_s=cfg.secagg.stage_timeout_s)
        self.mode = fed.secure_aggregation
        #: Called as ``on_receive(site, stage, message)`` with everything a site sends
        #: (experiments and tests record what the aggregator actually sees).
        self.on_receive = None
        self.out_dir = Path(ag.out_dir).expanduser()
        (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        if completed_round >= fed.rounds:
            raise FedbratsError(f"aggregator: federation {fed.name!r} already completed its "
                                f"{fed.rounds} round(s) in {self.out_dir}; use a new out_dir")
        self._state = sm.initial_state(self.params, clock(), completed_round=completed_round)
        self._sites: dict[str, _Site] = {}
        if fed.secure_aggregation == "mask":
            self._sum = sa.MaskedFedAvg(cfg)
        elif fed.secure_aggregation == "ckks":
            from aggregator.ckks import CKKSSum

            self._sum = CKKSSum(cfg)
        else:
            self._sum = make_secure_sum(fed.secure_aggregation)
        self._global = initial_model
        if fed.secure_aggregation == "mask":
            # Fail at start-up, not at round 1: the bit budget (with any DP noise headroom,
            # which depends on the model's size) must fit the modulus.
            from fedbrats.masking import quant_params

            quant_params(cfg, dim=sum(int(np.asarray(v).size) for v in initial_model.values()))
        self._global_payload = wire.pack_tensors(initial_model)
        self.model_signature = wire.model_signature(initial_model)
        self._result_payloads: dict[int, wire.Payload] = {}
        self._round_loss: dict[str, float] = {}
        self._finished = threading.Event()
        self._started = clock()
        self._save_model = save_model or self._save_model_file
        if ag.record_dir:
            self.on_receive = _Recorder(Path(ag.record_dir).expanduser(), lambda: self._state.round)
        #: True when the server runs with mutual TLS: every request's site id must equal the
        #: peer certificate's CN.  Set by :func:`run_server`.
        self.require_peer_identity = False

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> sm.RoundState:
        with self._cond:
            return self._state

    @property
    def finished(self) -> threading.Event:
        return self._finished

    def _apply(self, event: sm.Event) -> None:
        """Advance the state machine and carry out its effects.  Caller holds the lock."""
        pending = [event]
        while pending:
            ev = pending.pop(0)
            before = self._state
            self._state, effects = sm.advance(self._state, ev)
            self._sync_masked()
            self._log_stage_change(before, self._state)
            for eff in effects:
                follow = self._perform(eff)
                if follow is not None:
                    pending.append(follow)
        self._cond.notify_all()

    def _sync_masked(self) -> None:
        """Hand the survivor sets U1..U3 the state machine fixed to the masked round."""
        rnd = self._masked_round()
        if rnd is None or rnd.round != self._state.round:
            return
        sets = dict(self._state.survivors)
        rnd.u1 = tuple(sets.get("advertise_keys", ()))
        rnd.u2 = tuple(sets.get("share_keys", ()))
        rnd.u3 = tuple(sets.get("masked_input", ()))

    def _log_stage_change(self, before: sm.RoundState, after: sm.RoundState) -> None:
        if before.stage is after.stage or before.round != after.round:
            return
        if before.stage in (sm.Stage.ADVERTISE_KEYS, sm.Stage.SHARE_KEYS, sm.Stage.MASKED_INPUT):
            done = dict(after.survivors).get(before.stage.value, ())
            _LOGGER.info("round %d stage %s: complete with %d site(s): %s", after.round,
                         before.stage.value, len(done), ", ".join(done))

    def _masked_round(self) -> sa.MaskedRound | None:
        return self._sum.current if isinstance(self._sum, sa.MaskedFedAvg) else None

    def _received(self, site: str, stage: str, message) -> None:
        if self.on_receive is not None:
            self.on_receive(site, stage, message)

    def _perform(self, eff: sm.Effect) -> sm.Event | None:
        if isinstance(eff, sm.StartRound):
            self._sum.begin_round(eff.round, self._global)
            self._round_loss = {}
            _LOGGER.info("round %d stage training: started with sites %s", eff.round,
                         ", ".join(eff.participants))
            self._event("round_started", round=eff.round, sites=list(eff.participants))
            return None
        if isinstance(eff, (sm.AggregateRound, sm.UnmaskRound)):
            sites = eff.sites if isinstance(eff, sm.AggregateRound) else eff.survivors
            if isinstance(eff, sm.UnmaskRound):
                _LOGGER.info("round %d stage unmask: unmasking the sum of %d masked input(s) "
                             "(U2 %d, U3 %d, U4 %d; dropped after sharing keys: %s)", eff.round,
                             len(eff.survivors), len(eff.shared), len(eff.survivors),
                             len(eff.responders),
                             ", ".join(s for s in eff.shared if s not in eff.survivors) or "none")
            try:
                result = self._sum.finalize(sites)
            except RoundAborted as exc:
                return sm.Abort(str(exc), self.clock())
            except FedbratsError as exc:
                return sm.Abort(f"round {eff.round}: aggregation failed: {exc}", self.clock())
            if isinstance(result, wire.Payload):
                # ckks: the result is the encrypted aggregate; the new global model exists only
                # at the sites.  Its identity for the next round is the aggregate's SHA-256.
                self._global = None
                self._global_payload = result
            else:
                self._global = result
                self._global_payload = wire.pack_tensors(result)
            self._result_payloads[eff.round] = self._global_payload
            self._result_payloads.pop(eff.round - 2, None)
            if self._global is not None:
                self._checkpoint(eff.round)
            losses = [self._round_loss[s] for s in sites if s in self._round_loss]
            _LOGGER.info("round %d stage aggregating: aggregated %d update(s) from %s; "
                         "mean train loss %.4f", eff.round, len(sites), ", ".join(sites),
                         float(np.mean(losses)) if losses else float("nan"))
            extra = {}
            if isinstance(eff, sm.UnmaskRound):
                extra = {"secagg": {"U1": len(dict(self._state.survivors).get("advertise_keys", ())),
                                    "U2": len(eff.shared), "U3": len(eff.survivors),
                                    "U4": len(eff.responders),
                                    "dropped": [s for s in eff.shared if s not in eff.survivors]}}
            self._event("round_aggregated", round=eff.round, sites=list(sites),
                        mean_train_loss=float(np.mean(losses)) if losses else None, **extra)
            return sm.RoundAggregated(eff.round, self.clock())
        if isinstance(eff, sm.StageDeadline):
            _LOGGER.warning("round %d stage %s: deadline passed without %s; they sit out later "
                            "rounds until they join again", eff.round, eff.stage,
                            ", ".join(eff.missing))
            self._event("stage_deadline", round=eff.round, stage=eff.stage,
                        missing=list(eff.missing))
            return None
        if isinstance(eff, sm.Finished):
            if eff.failed:
                _LOGGER.error("federation %s failed: %s", self.federation_id, eff.message)
            else:
                _LOGGER.info("federation %s: %s", self.federation_id, eff.message)
                self._save_final()
            self._event("finished", failed=eff.failed, message=eff.message)
            self._finished.set()
            return None
        raise TypeError(f"unknown effect {eff!r}")

    def tick(self) -> None:
        with self._cond:
            self._apply(sm.Tick(self.clock()))

    def abort(self, reason: str) -> None:
        with self._cond:
            self._apply(sm.Abort(reason, self.clock()))

    # -- outputs ---------------------------------------------------------------------------

    def _event(self, kind: str, **fields) -> None:
        rec = {"event": kind, "t": round(self.clock() - self._started, 3), **fields}
        with open(self.out_dir / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _save_model_file(self, path: Path, tensors: dict[str, np.ndarray], rnd: int) -> None:
        from node.model import save_model_file

        save_model_file(path, tensors, model_cfg=self.cfg.model, labels=self.cfg.data.labels,
                        round=rnd, federation=self.federation_id)

    def _checkpoint(self, rnd: int) -> None:
        path = self.out_dir / "checkpoints" / f"round-{rnd:04d}.pt"
        self._save_model(path, self._global, rnd)
        # The resume point: written after the checkpoint, atomically, so a crash at any moment
        # leaves either the previous or this complete round to resume from.
        rec = {"federation": self.federation_id, "completed_round": rnd,
               "checkpoint": path.name, "sha256": self._global_payload.info.sha256.hex()}
        tmp = self.out_dir / "resume.json.tmp"
        tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / RESUME_FILE)

    def _save_final(self) -> None:
        if self._global is None:
            _LOGGER.info("ckks mode: the final model exists only at the sites (each writes "
                         "final_model.pt in its node.state_dir)")
            return
        self._save_model(self.out_dir / "final_model.pt", self._global,
                         self._state.completed_round)

    # -- request checks --------------------------------------------------------------------

    def authorize(self, peer_site: str | None, env: wire.Envelope) -> None:
        """Bind the TLS peer's certificate CN to the site the request names.

        ``peer_site`` is None when the server runs without TLS (``--insecure``).

        Raises:
            Unauthenticated: TLS is on and the peer has no certificate CN.
            NotAuthorized: the CN differs from ``env.site_id``, is revoked, or is not an
                allowed site.
        """
        if not self.require_peer_identity:
            return
        if not peer_site:
            raise Unauthenticated("no client certificate: mutual TLS is required")
        ag = self.cfg.aggregator
        if peer_site in ag.revoked_sites:
            raise NotAuthorized(f"site {peer_site!r} is revoked in federation "
                                f"{self.federation_id!r}")
        if peer_site == "aggregator" or (ag.allowed_sites and peer_site not in ag.allowed_sites):
            raise NotAuthorized(f"certificate {peer_site!r} is not a site of federation "
                                f"{self.federation_id!r}")
        if env.site_id != peer_site:
            raise NotAuthorized(f"certificate of site {peer_site!r} cannot act as site "
                                f"{env.site_id!r}")

    def _check_envelope(self, env: wire.Envelope, *, joined: bool = True) -> None:
        if env.protocol_version != wire.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {env.protocol_version} is not supported "
                                f"(this aggregator speaks {wire.PROTOCOL_VERSION})")
        if env.federation_id != self.federation_id:
            raise ProtocolError(f"request is for federation {env.federation_id!r}; this is "
                                f"{self.federation_id!r}")
        if not env.site_id:
            raise ProtocolError("request carries no site id")
        if joined and env.site_id not in self._sites:
            raise UnknownSite(f"site {env.site_id!r} has not joined federation "
                              f"{self.federation_id!r}")

    def _check_round_stage(self, env: wire.Envelope, stage: str) -> None:
        s = self._state
        if s.stage.value != stage:
            raise ProtocolError(f"site {env.site_id}: round {env.round} stage {env.stage} "
                                f"refused: the aggregator is in stage {s.stage.value} of round "
                                f"{s.round}")
        if env.round != s.round:
            kind = "stale" if env.round < s.round else "future"
            raise ProtocolError(f"site {env.site_id}: {kind} round {env.round}; the current "
                                f"round is {s.round}")
        if env.stage != stage:
            raise ProtocolError(f"site {env.site_id}: wrong stage {env.stage!r} for round "
                                f"{s.round}; expected {stage!r}")

    # -- RPC implementations ---------------------------------------------------------------

    def join(self, env: wire.Envelope, info: wire.JoinInfo) -> wire.JoinReply:
        with self._cond:
            self._check_envelope(env, joined=False)
            if self._state.stage is sm.Stage.DONE:
                raise ProtocolError(f"site {env.site_id}: the federation has ended")
            if info.num_train_samples < 1:
                raise ProtocolError(f"site {env.site_id}: needs at least one training case")
            if info.secure_aggregation and info.secure_aggregation != self.mode:
                raise ProtocolError(f"site {env.site_id} is configured for secure_aggregation = "
                                    f"{info.secure_aggregation!r}, but federation "
                                    f"{self.federation_id!r} runs {self.mode!r}")
            if info.model_signature and info.model_signature != self.model_signature:
                raise ProtocolError(f"site {env.site_id}: its [model] section builds a different "
                                    f"network than the federation's (tensor names or shapes "
                                    f"differ); use the federation's model settings")
            rejoin = env.site_id in self._sites
            self._sites[env.site_id] = _Site(info.num_train_samples, info.num_val_samples,
                                             info.device)
            _LOGGER.info("site %s %s (train %d, val %d cases, %s)", env.site_id,
                         "re-joined" if rejoin else "joined", info.num_train_samples,
                         info.num_val_samples, info.device)
            self._apply(sm.SiteJoined(env.site_id, self.clock()))
            return wire.JoinReply(True, "joined", self.params.total_rounds,
                                  self.params.expected_sites)

    def task_for(self, site: str, last_completed: int) -> wire.Task:
        """What ``site`` should do now.  Caller holds the lock."""
        s = self._state
        total = self.params.total_rounds
        if s.stage is sm.Stage.DONE and (s.failed or last_completed >= s.completed_round):
            self._sites[site].told_done = True
            return wire.Task("done", s.completed_round, total, message=s.message, failed=s.failed)
        if s.completed_round > last_completed and s.completed_round in self._result_payloads:
            return wire.Task("result", s.completed_round, total,
                             self._result_payloads[s.completed_round].info.sha256)
        if s.stage.value in _ROUND_STAGES and site in s.expected:
            return wire.Task(s.stage.value, s.round, total, self._global_payload.info.sha256,
                             self.cfg.training.local_steps, submitted=site in s.submitted)
        return wire.Task("joining" if s.stage is sm.Stage.JOINING else "training",
                         s.round, total, message=f"waiting ({s.stage.value})")

    def get_task(self, env: wire.Envelope, last_completed: int, wait_ms: int) -> wire.Task:
        deadline = self.clock() + min(max(wait_ms, 0), MAX_WAIT_MS) / 1000.0
        with self._cond:
            self._check_envelope(env)
            task = self.task_for(env.site_id, last_completed)
            while not _actionable(task) and self.clock() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - self.clock())))
                task = self.task_for(env.site_id, last_completed)
            return task

    def model_payload(self, env: wire.Envelope) -> wire.Payload:
        with self._cond:
            self._check_envelope(env)
            s = self._state
            if s.stage.value not in _ROUND_STAGES or env.round != s.round:
                raise ProtocolError(f"site {env.site_id}: no global model for round {env.round} "
                                    f"(the aggregator is in stage {s.stage.value} of round "
                                    f"{s.round})")
            if self._global is None:
                raise ProtocolError(f"site {env.site_id}: in ckks mode the global model of round "
                                    f"{env.round} exists only at the sites (decrypted from round "
                                    f"{env.round - 1}'s aggregate); the aggregator cannot send it")
            return self._global_payload

    def result_payload(self, env: wire.Envelope) -> wire.Payload:
        with self._cond:
            self._check_envelope(env)
            payload = self._result_payloads.get(env.round)
            if payload is None:
                raise ProtocolError(f"site {env.site_id}: no result is published for round "
                                    f"{env.round} (completed round: "
                                    f"{self._state.completed_round})")
            return payload

    def submit_update(self, header: wire.UpdateHeader, body: Iterator) -> wire.SubmitReply:
        env = header.envelope
        stage = self._update_stage
        with self._cond:
            self._check_envelope(env)
            if env.site_id in self._state.submitted and env.round == self._state.round \
                    and self._state.stage.value == stage:
                return wire.SubmitReply(True, True, "duplicate: already counted once")
            self._check_round_stage(env, stage)
            if header.metadata.base_model_sha256 != self._global_payload.info.sha256:
                raise ProtocolError(f"site {env.site_id}: round {env.round} update was computed "
                                    f"from another global model")
            if header.payload.scheme != {"mask": "mask", "ckks": "ckks"}.get(self.mode, "plain"):
                raise ProtocolError(f"site {env.site_id}: payload scheme "
                                    f"{header.payload.scheme!r} does not match mode "
                                    f"{self.cfg.federation.secure_aggregation!r}")
        # Receive outside the lock: other sites stream concurrently.
        payload = wire.receive_update_body(header, body)
        tensors = wire.unpack_tensors(payload)
        with self._cond:
            # The round may have moved on while the bytes streamed.
            if env.site_id in self._state.submitted and env.round == self._state.round \
                    and self._state.stage.value == stage:
                return wire.SubmitReply(True, True, "duplicate: already counted once")
            self._check_round_stage(env, stage)
            self._received(env.site_id, stage, tensors)
            try:
                self._sum.add(env.site_id, header.metadata.num_samples, tensors)
            except UpdateRejected:
                # The site is excluded from this round (case K10): the round goes on without
                # waiting for it until the deadline.
                self._apply(sm.Excluded(env.site_id, env.round, self.clock()))
                raise
            self._round_loss[env.site_id] = header.metadata.train_loss
            _LOGGER.info("round %d stage %s: update from site %s accepted (%d bytes, %s, "
                         "loss %.4f)", env.round, stage, env.site_id, payload.info.total_bytes,
                         {"mask": "weight masked", "ckks": "weight encrypted"}.get(
                             self.mode, f"weight {header.metadata.num_samples}"),
                         header.metadata.train_loss)
            self._apply(sm.Submitted(env.site_id, env.round, sm.Stage(stage), self.clock()))
            return wire.SubmitReply(True, False, "accepted")

    @property
    def _update_stage(self) -> str:
        return "masked_input" if self.mode == "mask" else "training"

    # -- secure aggregation (mask mode) ----------------------------------------------------

    def _masked_stage(self, env: wire.Envelope, stage: str) -> sa.MaskedRound:
        """Checks for a mask-mode RPC that *acts* in ``stage``.  Caller holds the lock."""
        self._check_envelope(env)
        if self.mode != "mask":
            raise ProtocolError(f"site {env.site_id}: secure aggregation is "
                                f"{self.mode!r}, not 'mask'")
        self._check_round_stage(env, stage)
        rnd = self._masked_round()
        if rnd is None:
            raise ProtocolError(f"site {env.site_id}: no masked round in progress")
        return rnd

    def _masked_after(self, env: wire.Envelope, stage: str) -> sa.MaskedRound:
        """Checks for a mask-mode RPC that *reads* what ``stage`` produced (any later stage)."""
        self._check_envelope(env)
        rnd = self._masked_round()
        s = self._state
        order = list(_MASK_ORDER)
        if (self.mode != "mask" or rnd is None or env.round != s.round
                or s.stage.value not in order or order.index(s.stage.value) <= order.index(stage)):
            raise ProtocolError(f"site {env.site_id}: round {env.round}: the {stage} stage has "
                                f"not closed (the aggregator is in stage {s.stage.value} of round "
                                f"{s.round})")
        return rnd

    def advertise_keys(self, env: wire.Envelope, adv: masking.Advertisement) -> None:
        with self._cond:
            rnd = self._masked_stage(env, "advertise_keys")
            if adv.site != env.site_id:
                raise ProtocolError(f"site {env.site_id}: advertised keys name site {adv.site!r}")
            if env.site_id in self._state.submitted:
                return
            self._received(env.site_id, "advertise_keys", adv)
            rnd.add_advertisement(adv)
            self._apply(sm.Submitted(env.site_id, env.round, sm.Stage.ADVERTISE_KEYS, self.clock()))

    def get_keys(self, env: wire.Envelope):
        with self._cond:
            rnd = self._masked_after(env, "advertise_keys")
            adverts, neighbours = rnd.keys_for(env.site_id)
            return adverts, neighbours, rnd.threshold, masking.graph_seed(self.federation_id, rnd.round)

    def share_keys(self, env: wire.Envelope, bundles: list[masking.EncryptedShares]) -> None:
        with self._cond:
            rnd = self._masked_stage(env, "share_keys")
            if env.site_id in self._state.submitted:
                return
            self._received(env.site_id, "share_keys", bundles)
            rnd.add_shares(env.site_id, bundles)
            self._apply(sm.Submitted(env.site_id, env.round, sm.Stage.SHARE_KEYS, self.clock()))

    def get_shares(self, env: wire.Envelope):
        with self._cond:
            return self._masked_after(env, "share_keys").shares_for(env.site_id)

    def get_survivors(self, env: wire.Envelope):
        with self._cond:
            rnd = self._masked_after(env, "masked_input")
            if env.site_id not in rnd.u3:
                raise ProtocolError(f"site {env.site_id}: round {env.round}: its masked input "
                                    f"did not arrive in time; it takes no part in unmasking")
            return rnd.survivors()

    def unmask(self, env: wire.Envelope, shares: list[masking.RevealedShare]) -> None:
        with self._cond:
            rnd = self._masked_stage(env, "unmask")
            if env.site_id in self._state.submitted:
                return
            self._received(env.site_id, "unmask", shares)
            rnd.add_revealed(env.site_id, shares)
            self._apply(sm.Submitted(env.site_id, env.round, sm.Stage.UNMASK, self.clock()))

    def report_metrics(self, env: wire.Envelope, m: wire.MetricsReport) -> None:
        with self._cond:
            self._check_envelope(env)
            if not 1 <= env.round <= self._state.completed_round:
                raise ProtocolError(f"site {env.site_id}: metrics for round {env.round}, but the "
                                    f"completed round is {self._state.completed_round}")
            rec = {
                "round": env.round, "site": env.site_id,
                "dice": {k: _num(v) for k, v in m.dice.items()},
                "hd95": {k: _num(v) for k, v in m.hd95.items()},
                "num_val_cases": m.num_val_cases, "train_loss": _num(m.train_loss),
                "train_seconds": round(m.train_seconds, 3), "eval_seconds": round(m.eval_seconds, 3),
            }
            if self.mode in ("mask", "ckks"):
                rec["clipped_values"] = m.clipped_values
            if m.epsilon_sample or m.epsilon_site:
                rec["dp"] = {"epsilon_sample": _num(m.epsilon_sample) if m.epsilon_sample else None,
                             "delta_sample": m.delta_sample or None,
                             "epsilon_site": _num(m.epsilon_site) if m.epsilon_site else None,
                             "delta_site": m.delta_site or None}
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            _LOGGER.info("round %d: site %s Dice WT %.3f TC %.3f ET %.3f mean %.3f", env.round,
                         env.site_id, m.dice.get("wt", math.nan), m.dice.get("tc", math.nan),
                         m.dice.get("et", math.nan), m.dice.get("mean", math.nan))
            self._apply(sm.MetricsReported(env.site_id, env.round, self.clock()))

    def withdraw(self, env: wire.Envelope, reason: str) -> bool:
        """A site leaves the current round, saying why: the round stops waiting for it (it sits
        out later rounds until it rejoins, as an excluded site does).

        Returns:
            True if the site was still expected in the current round; False for a stale round
            or a site that had already submitted (nothing changes then).

        Raises:
            ProtocolError / UnknownSite: the envelope is for another federation or the site has
                not joined.
        """
        with self._cond:
            self._check_envelope(env)
            s = self._state
            expected = env.round == s.round and env.site_id in s.expected \
                and env.site_id not in s.submitted
            _LOGGER.warning("round %d stage %s: site %s withdrew%s: %s", env.round, env.stage,
                            env.site_id, "" if expected else " (nothing to withdraw from)",
                            reason or "no reason given")
            if expected:
                self._event("site_withdrew", round=env.round, site=env.site_id,
                            stage=s.stage.value, reason=reason)
                self._apply(sm.Excluded(env.site_id, env.round, self.clock()))
            return expected

    def all_sites_told_done(self) -> bool:
        with self._cond:
            return all(s.told_done for s in self._sites.values())


class _Recorder:
    """Writes what the aggregator receives (``aggregator.record_dir``; experiments only)."""

    def __init__(self, root: Path, current_round) -> None:
        self.root = root
        self.current_round = current_round
        _LOGGER.warning("aggregator.record_dir is set: everything sites send is kept in %s "
                        "(threat-model experiments only)", root)

    def __call__(self, site: str, stage: str, message) -> None:
        d = self.root / f"round-{self.current_round():04d}"
        d.mkdir(parents=True, exist_ok=True)
        if isinstance(message, dict):
            np.savez(d / f"{site}-{stage}.npz", **message)
        else:
            items = message if isinstance(message, list) else [message]
            rec = [{k: (v.hex() if isinstance(v, bytes) else v) for k, v in vars(m).items()}
                   for m in items]
            (d / f"{site}-{stage}.json").write_text(json.dumps(rec), encoding="utf-8")


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


_MASK_ORDER = ("advertise_keys", "share_keys", "masked_input", "unmask")
_ROUND_STAGES = ("training", *_MASK_ORDER)


def _actionable(task: wire.Task) -> bool:
    return task.stage in ("done", "result") or (
        task.stage in _ROUND_STAGES and bool(task.model_sha256) and not task.submitted)


class Servicer(wire.AggregatorServicer):
    """gRPC face of :class:`AggregatorCore`; maps fedbrats errors to status codes."""

    def __init__(self, core: AggregatorCore):
        self.core = core

    @staticmethod
    def _peer_site(context) -> str | None:
        names = context.auth_context().get("x509_common_name")
        return names[0].decode("utf-8", "replace") if names else None

    def _authorize(self, context, env: wire.Envelope) -> None:
        self.core.authorize(self._peer_site(context), env)

    @contextlib.contextmanager
    def _errors(self, context, what: str):
        try:
            yield
        except Unauthenticated as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except UnknownSite as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except NotAuthorized as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except UpdateRejected as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProtocolError as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except WireError as exc:
            _LOGGER.warning("%s refused: %s", what, exc)
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))

    def Join(self, request, context):
        env, info = wire.decode_join_request(request)
        with self._errors(context, f"join from {env.site_id!r}"):
            self._authorize(context, env)
            return wire.join_response(self.core.join(env, info))

    def GetTask(self, request, context):
        env, last, wait_ms = wire.decode_task_request(request)
        with self._errors(context, f"task for {env.site_id!r}"):
            self._authorize(context, env)
            return wire.task_response(self.core.get_task(env, last, wait_ms))

    def FetchModel(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"model fetch by {env.site_id!r}"):
            self._authorize(context, env)
            payload = self.core.model_payload(env)
        yield from wire.model_stream(payload)

    def FetchResult(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"result fetch by {env.site_id!r}"):
            self._authorize(context, env)
            payload = self.core.result_payload(env)
        yield from wire.result_stream(payload)

    def SubmitUpdate(self, request_iterator, context):
        with self._errors(context, "update"):
            header = wire.receive_update_header(request_iterator)
            self._authorize(context, header.envelope)
            return wire.submit_response(self.core.submit_update(header, request_iterator))

    def AdvertiseKeys(self, request, context):
        env, adv = wire.decode_advertise_keys_request(request, masking.Advertisement)
        with self._errors(context, f"key advertisement from {env.site_id!r}"):
            self._authorize(context, env)
            self.core.advertise_keys(env, adv)
            return wire.ack("AdvertiseKeysResponse")

    def GetKeys(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"key fetch by {env.site_id!r}"):
            self._authorize(context, env)
            return wire.get_keys_response(*self.core.get_keys(env))

    def ShareKeys(self, request, context):
        env, bundles = wire.decode_share_keys_request(request, masking.EncryptedShares)
        with self._errors(context, f"shares from {env.site_id!r}"):
            self._authorize(context, env)
            self.core.share_keys(env, bundles)
            return wire.ack("ShareKeysResponse")

    def GetShares(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"share fetch by {env.site_id!r}"):
            self._authorize(context, env)
            return wire.get_shares_response(*self.core.get_shares(env))

    def GetSurvivors(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"survivor fetch by {env.site_id!r}"):
            self._authorize(context, env)
            return wire.get_survivors_response(*self.core.get_survivors(env))

    def Unmask(self, request, context):
        with self._errors(context, "unmask"):
            env, shares = wire.decode_unmask_request(request, masking.RevealedShare)
            self._authorize(context, env)
            self.core.unmask(env, shares)
            return wire.ack("UnmaskResponse")

    def ReportMetrics(self, request, context):
        env, m = wire.decode_metrics_request(request)
        with self._errors(context, f"metrics from {env.site_id!r}"):
            self._authorize(context, env)
            self.core.report_metrics(env, m)
            return wire.metrics_response(True)

    def Withdraw(self, request, context):
        env = wire.decode_envelope_of(request)
        with self._errors(context, f"withdrawal of {env.site_id!r}"):
            env, reason = wire.decode_withdraw_request(request)
            self._authorize(context, env)
            return wire.ack("WithdrawResponse", self.core.withdraw(env, reason))


@contextlib.contextmanager
def run_server(core: AggregatorCore, host: str = "127.0.0.1", port: int = 0,
               max_message_mb: int = 4, credentials: grpc.ServerCredentials | None = None):
    """Serve ``core`` over gRPC (plus the standard health service) while the block runs.

    Args:
        credentials: mutual-TLS server credentials (:func:`server_credentials`); None serves
            plaintext without authentication (``--insecure``, tests of the protocol logic).

    Yields:
        The bound port (useful with ``port=0``).
    """
    # SO_REUSEPORT off: a second aggregator on the same port must fail, not share the port.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[*grpc_options(max_message_mb), ("grpc.so_reuseport", 0)])
    wire.add_aggregator_servicer(Servicer(core), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
            core.require_peer_identity = True
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise FedbratsError(f"aggregator: cannot listen on {host}:{port} (in use by another "
                            f"process, or not an address of this machine)")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(wire.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    ticker_stop = threading.Event()

    def _ticker():
        while not ticker_stop.wait(0.5):
            core.tick()

    t = threading.Thread(target=_ticker, name="aggregator-ticker", daemon=True)
    t.start()
    try:
        yield bound
    finally:
        ticker_stop.set()
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=2.0).wait()


def server_credentials(cfg: Config) -> grpc.ServerCredentials:
    """Mutual-TLS credentials from ``[tls]``: client certificates must chain to the CA.

    Raises:
        FedbratsError: a TLS file is missing or unreadable (names the field and file).
    """
    from crypto.pki import check_key_matches_cert, read_pem

    t = cfg.tls
    missing = [f"tls.{n}" for n in ("ca_cert", "cert", "key") if not getattr(t, n)]
    if missing:
        raise ConfigError("aggregator", [f"{', '.join(missing)} not set; run `fedbrats "
                                         f"provision`, or pass --insecure for local debugging"])
    key, cert = read_pem(t.key, "tls.key", private=True), read_pem(t.cert, "tls.cert")
    check_key_matches_cert(cert, key, "aggregator")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=read_pem(t.ca_cert, "tls.ca_cert"),
        require_client_auth=True)


def load_resume_point(cfg: Config) -> tuple[dict[str, np.ndarray], int] | None:
    """The last complete round's global model from ``out_dir/resume.json``, hash-verified.

    Returns:
        ``(model, completed_round)``, or None when ``out_dir`` holds no resume point.

    Raises:
        FedbratsError: the resume point belongs to another federation, or its checkpoint is
            missing or does not match the recorded SHA-256 (names the file).
    """
    from node.model import read_model_file

    out = Path(cfg.aggregator.out_dir).expanduser()
    rp = out / RESUME_FILE
    if not rp.exists():
        return None
    try:
        rec = json.loads(rp.read_text(encoding="utf-8"))
        ckpt, rnd, sha = out / "checkpoints" / rec["checkpoint"], int(rec["completed_round"]), rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedbratsError(f"aggregator: {rp} is unreadable ({exc}); move it away to start "
                            f"afresh") from None
    if rec.get("federation") != cfg.federation.name:
        raise FedbratsError(f"aggregator: {rp} belongs to federation {rec.get('federation')!r}, "
                            f"not {cfg.federation.name!r}; use another aggregator.out_dir")
    state, _meta = read_model_file(ckpt)
    if wire.payload_sha256(state).hex() != sha:
        raise FedbratsError(f"aggregator: checkpoint {ckpt} does not match the SHA-256 recorded "
                            f"in {rp}; refusing to resume from it")
    return state, rnd


def initial_global_model(cfg: Config) -> dict[str, np.ndarray]:
    """Round-1 global model: the configured SegResNet initialised from ``federation.seed``."""
    import torch

    from node.model import build_model, state_to_numpy

    torch.manual_seed(cfg.federation.seed)
    return state_to_numpy(build_model(cfg.model))


def serve(cfg: Config, *, insecure: bool = False) -> int:
    """Run the aggregator daemon until the federation ends.

    Args:
        cfg: aggregator configuration; ``[tls]`` must be set unless ``insecure``.
        insecure: serve plaintext gRPC without client authentication (prints a warning).

    Returns:
        0 on success, :attr:`RoundAborted.exit_code` if the federation failed.

    Raises:
        FedbratsError: TLS material missing or unreadable.
    """
    if insecure:
        creds = None
        _LOGGER.warning(INSECURE_WARNING)
    else:
        creds = server_credentials(cfg)
    resume = load_resume_point(cfg)
    if resume is not None:
        model, completed = resume
        _LOGGER.warning("aggregator: resuming federation %s after round %d from its verified "
                        "checkpoint; sites must join again", cfg.federation.name, completed)
    else:
        model, completed = initial_global_model(cfg), 0
    n_params = sum(int(v.size) for v in model.values())
    core = AggregatorCore(cfg, model, completed_round=completed)
    ag = cfg.aggregator
    with run_server(core, ag.host, ag.port, ag.max_message_mb, creds) as port:
        port_file = core.out_dir / "aggregator.port"
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
        _LOGGER.info("aggregator for federation %s listening on %s:%d (%s); %d round(s), %d "
                     "site(s) expected, model %.2fM parameters, secure aggregation %s",
                     cfg.federation.name, ag.host, port,
                     "plaintext, NO authentication" if insecure else "mutual TLS",
                     cfg.federation.rounds,
                     cfg.federation.sites, n_params / 1e6, cfg.federation.secure_aggregation)
        core.finished.wait()
        end = time.monotonic() + LINGER_S
        while time.monotonic() < end and not core.all_sites_told_done():
            time.sleep(0.2)
    st = core.state
    if st.failed:
        _LOGGER.error("exit: %s", st.message)
        return RoundAborted.exit_code
    return 0
