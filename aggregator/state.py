"""The aggregator's round state machine: pure, no I/O, no gRPC, no clocks.

The server feeds :class:`Event` objects (a site joined, an update was accepted, a round was
aggregated, metrics arrived, time passed) into :func:`advance`, which returns the next
:class:`RoundState` and a list of :class:`Effect` objects for the server to carry out
(aggregate a round, finish the federation).  Time is an argument (seconds on any monotonic
clock), so tests drive deadlines without sleeping.

Stages (:class:`Stage`):

``JOINING`` → ``TRAINING(r)`` → ``AGGREGATING(r)`` → ``TRAINING(r+1)`` … → ``FINISHING`` → ``DONE``

and, with secure aggregation by masking (``Params.mode == "mask"``; Bonawitz et al., CCS 2017),
each round instead runs

``ADVERTISE_KEYS`` → ``SHARE_KEYS`` → ``MASKED_INPUT`` → ``UNMASK`` → ``AGGREGATING``

where each stage expects the sites that completed the previous one (U1 ⊇ U2 ⊇ U3 ⊇ U4) and
closes when all of them acted, or at its deadline if at least ``threshold`` did; with fewer the
round aborts and nothing is released.

- JOINING: waits until ``expected_sites`` have joined, or until ``min_sites`` have and
  ``join_timeout_s`` has passed since the first join; it never gives up on its own (a daemon
  waits for its sites; the operator stops it).
- TRAINING(r): collects updates from the round's participants (the sites joined when the round
  started).  When all have submitted, or at the round deadline with at least ``min_sites``
  updates, it emits :class:`AggregateRound`; at the deadline with fewer, the federation fails
  (nothing is released).
- AGGREGATING(r): waits for the server's :class:`RoundAggregated`.
- FINISHING: the last round is aggregated; waits for every participant's metrics on it (or
  ``metrics_timeout_s``).
- DONE: the federation is over; ``failed`` and ``message`` say how it ended.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Stage(enum.Enum):
    JOINING = "joining"
    TRAINING = "training"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    AGGREGATING = "aggregating"
    FINISHING = "finishing"
    DONE = "done"


@dataclass(frozen=True)
class Params:
    """Fixed parameters of a federation's schedule.

    Attributes:
        total_rounds: rounds to run (>= 1).
        expected_sites: sites the federation waits for at the start.
        min_sites: fewest updates a round may be aggregated from.
        join_timeout_s: seconds after the first join to wait for the other sites.
        round_timeout_s: seconds from a round's start to its update deadline.
        metrics_timeout_s: seconds to wait for the last round's metrics.
        mode: ``none`` (plaintext updates) or ``mask`` (the four SecAgg stages).
        threshold: (mask) fewest sites each SecAgg stage needs, the Shamir threshold t.
        stage_timeout_s: (mask) deadline of the key and unmask stages, seconds.
    """

    total_rounds: int
    expected_sites: int
    min_sites: int
    join_timeout_s: float
    round_timeout_s: float
    metrics_timeout_s: float
    mode: str = "none"
    threshold: int = 0
    stage_timeout_s: float = 60.0


#: What each collecting stage waits for, for messages.
_WHAT = {
    "training": "update(s)",
    "advertise_keys": "key advertisement(s)",
    "share_keys": "share set(s)",
    "masked_input": "masked input(s)",
    "unmask": "unmask share set(s)",
}
_MASK_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)


@dataclass(frozen=True)
class RoundState:
    """Everything the schedule knows.  Immutable; :func:`advance` returns a new one."""

    params: Params
    stage: Stage = Stage.JOINING
    round: int = 0
    joined: tuple[str, ...] = ()
    participants: tuple[str, ...] = ()
    #: Sites the current stage waits for (participants, then U1, U2, U3 in mask mode).
    expected: tuple[str, ...] = ()
    #: Sites that acted in the current stage.
    submitted: tuple[str, ...] = ()
    #: Mask mode: the sites that completed each finished stage of this round, by stage value
    #: (``advertise_keys`` = U1, ``share_keys`` = U2, ``masked_input`` = U3, ``unmask`` = U4).
    survivors: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Sites whose update counted in the last aggregated round (for the metrics wait).
    contributors: tuple[str, ...] = ()
    #: Sites that missed a stage deadline; left out of later rounds until they join again.
    inactive: tuple[str, ...] = ()
    completed_round: int = 0
    metrics_reported: tuple[str, ...] = ()
    started_at: float | None = None
    first_join_at: float | None = None
    stage_started_at: float = 0.0
    failed: bool = False
    message: str = ""


# Events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class SiteJoined:
    site: str
    now: float


@dataclass(frozen=True)
class Submitted:
    """``site`` completed ``stage`` of ``round`` (an update, keys, shares ...)."""

    site: str
    round: int
    stage: Stage
    now: float


def UpdateAccepted(site: str, round: int, now: float) -> Submitted:  # noqa: N802
    """A plaintext update arrived (the TRAINING stage's submission)."""
    return Submitted(site, round, Stage.TRAINING, now)


@dataclass(frozen=True)
class Excluded:
    """``site``'s submission for the current stage of ``round`` was refused (e.g. non-finite
    values): the stage no longer waits for it, and it sits out later rounds until it rejoins."""

    site: str
    round: int
    now: float


@dataclass(frozen=True)
class RoundAggregated:
    round: int
    now: float


@dataclass(frozen=True)
class MetricsReported:
    site: str
    round: int
    now: float


@dataclass(frozen=True)
class Abort:
    reason: str
    now: float


Event = Tick | SiteJoined | Submitted | Excluded | RoundAggregated | MetricsReported | Abort


# Effects --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRound:
    round: int
    participants: tuple[str, ...]


@dataclass(frozen=True)
class AggregateRound:
    round: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskRound:
    """Mask mode: remove the masks and aggregate.

    Attributes:
        shared: U2, the sites whose shares were distributed (their masks are in the sum).
        survivors: U3, the sites whose masked input is in the sum.
        responders: U4, the sites whose revealed shares arrived.
    """

    round: int
    shared: tuple[str, ...]
    survivors: tuple[str, ...]
    responders: tuple[str, ...]


@dataclass(frozen=True)
class StageDeadline:
    """A stage closed at its deadline without ``missing`` (they sit out later rounds)."""

    round: int
    stage: str
    missing: tuple[str, ...]


@dataclass(frozen=True)
class Finished:
    failed: bool
    message: str


Effect = StartRound | AggregateRound | UnmaskRound | StageDeadline | Finished


def initial_state(params: Params, now: float, *, completed_round: int = 0) -> RoundState:
    """The state of a federation that starts (or, after a crash, resumes) at ``now``.

    Args:
        completed_round: rounds already completed and checkpointed; the first round to run is
            the next one.  Sites must join again.
    """
    return RoundState(params=params, started_at=now, stage_started_at=now, round=completed_round,
                      completed_round=completed_round)


def advance(state: RoundState, event: Event) -> tuple[RoundState, list[Effect]]:
    """Apply one event.  Events that do not fit the state leave it unchanged.

    Returns:
        ``(new_state, effects)``.
    """
    if state.stage is Stage.DONE:
        return state, []
    if isinstance(event, Abort):
        return _fail(state, event.reason)
    if isinstance(event, SiteJoined):
        return _on_join(state, event)
    if isinstance(event, Submitted):
        return _on_submitted(state, event)
    if isinstance(event, Excluded):
        return _on_excluded(state, event)
    if isinstance(event, RoundAggregated):
        return _on_aggregated(state, event)
    if isinstance(event, MetricsReported):
        return _on_metrics(state, event)
    if isinstance(event, Tick):
        return _on_tick(state, event.now)
    raise TypeError(f"unknown event {event!r}")


def _fail(state: RoundState, message: str) -> tuple[RoundState, list[Effect]]:
    s = replace(state, stage=Stage.DONE, failed=True, message=message)
    return s, [Finished(True, message)]


def _start_round(state: RoundState, rnd: int, now: float) -> tuple[RoundState, list[Effect]]:
    participants = tuple(sorted(s for s in state.joined if s not in state.inactive))
    first = Stage.ADVERTISE_KEYS if state.params.mode == "mask" else Stage.TRAINING
    s = replace(state, stage=first, round=rnd, participants=participants, expected=participants,
                submitted=(), survivors=(), stage_started_at=now)
    return s, [StartRound(rnd, participants)]


def _need(state: RoundState) -> int:
    """Fewest submissions with which the current stage may close at its deadline."""
    if state.stage in _MASK_STAGES:
        return state.params.threshold
    return state.params.min_sites


def _deadline(state: RoundState) -> float:
    p = state.params
    if state.stage in (Stage.TRAINING, Stage.MASKED_INPUT):
        return state.stage_started_at + p.round_timeout_s
    return state.stage_started_at + p.stage_timeout_s


def _close_stage(state: RoundState, now: float) -> tuple[RoundState, list[Effect]]:
    """The current collecting stage is over with ``state.submitted``: move on."""
    done = state.submitted
    survivors = (*state.survivors, (state.stage.value, done))
    s = replace(state, survivors=survivors, stage_started_at=now)
    if state.stage is Stage.TRAINING:
        return replace(s, stage=Stage.AGGREGATING, contributors=done), [
            AggregateRound(state.round, done)]
    if state.stage is Stage.UNMASK:
        sets = dict(survivors)
        return replace(s, stage=Stage.AGGREGATING, contributors=sets["masked_input"]), [
            UnmaskRound(state.round, sets["share_keys"], sets["masked_input"], done)]
    following = {Stage.ADVERTISE_KEYS: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.MASKED_INPUT,
                 Stage.MASKED_INPUT: Stage.UNMASK}[state.stage]
    return replace(s, stage=following, expected=done, submitted=()), []


def _on_join(state: RoundState, ev: SiteJoined) -> tuple[RoundState, list[Effect]]:
    if ev.site in state.joined:
        if ev.site in state.inactive:
            return replace(state, inactive=tuple(s for s in state.inactive if s != ev.site)), []
        return state, []
    s = replace(state, joined=tuple(sorted((*state.joined, ev.site))),
                first_join_at=state.first_join_at if state.first_join_at is not None else ev.now)
    if s.stage is Stage.JOINING and len(s.joined) >= s.params.expected_sites:
        return _start_round(s, s.completed_round + 1, ev.now)
    return s, []


def _on_submitted(state: RoundState, ev: Submitted) -> tuple[RoundState, list[Effect]]:
    if state.stage is not ev.stage or ev.round != state.round:
        return state, []
    if ev.site not in state.expected or ev.site in state.submitted:
        return state, []
    s = replace(state, submitted=tuple(sorted((*state.submitted, ev.site))))
    if set(s.submitted) == set(s.expected):
        return _close_stage(s, ev.now)
    return s, []


def _on_excluded(state: RoundState, ev: Excluded) -> tuple[RoundState, list[Effect]]:
    if ev.round != state.round or ev.site not in state.expected or ev.site in state.submitted:
        return state, []
    s = replace(state, expected=tuple(x for x in state.expected if x != ev.site),
                inactive=tuple(sorted({*state.inactive, ev.site})))
    if s.expected and set(s.submitted) == set(s.expected):
        if len(s.submitted) < _need(s):
            return _fail(s, f"round {s.round} stage {s.stage.value}: only {len(s.submitted)} of "
                            f"the {_need(s)} needed {_WHAT.get(s.stage.value, 'submissions')} "
                            f"remain after excluding {ev.site}; nothing released")
        return _close_stage(s, ev.now)
    return s, []


def _on_aggregated(state: RoundState, ev: RoundAggregated) -> tuple[RoundState, list[Effect]]:
    if state.stage is not Stage.AGGREGATING or ev.round != state.round:
        return state, []
    s = replace(state, completed_round=ev.round)
    if ev.round >= s.params.total_rounds:
        return replace(s, stage=Stage.FINISHING, metrics_reported=(), stage_started_at=ev.now), []
    return _start_round(s, ev.round + 1, ev.now)


def _on_metrics(state: RoundState, ev: MetricsReported) -> tuple[RoundState, list[Effect]]:
    if state.stage is not Stage.FINISHING or ev.round != state.completed_round:
        return state, []
    if ev.site in state.metrics_reported:
        return state, []
    s = replace(state, metrics_reported=tuple(sorted((*state.metrics_reported, ev.site))))
    if set(s.contributors) <= set(s.metrics_reported):
        return _done(s)
    return s, []


def _done(state: RoundState) -> tuple[RoundState, list[Effect]]:
    msg = f"federation complete: {state.completed_round} round(s)"
    return replace(state, stage=Stage.DONE, message=msg), [Finished(False, msg)]


def _on_tick(state: RoundState, now: float) -> tuple[RoundState, list[Effect]]:
    p = state.params
    if state.stage is Stage.JOINING:
        # A daemon waits for its sites as long as it takes; once the first has joined, it
        # starts with whoever is there after join_timeout_s, provided min_sites have joined.
        n = len(state.joined)
        if (n >= p.min_sites and state.first_join_at is not None
                and now - state.first_join_at >= p.join_timeout_s):
            return _start_round(state, state.completed_round + 1, now)
        return state, []
    if state.stage.value in _WHAT and now >= _deadline(state):
        k, need = len(state.submitted), _need(state)
        missing = tuple(x for x in state.expected if x not in state.submitted)
        state = replace(state, inactive=tuple(sorted({*state.inactive, *missing})))
        note: list[Effect] = [StageDeadline(state.round, state.stage.value, missing)]
        if k >= need:
            state, effects = _close_stage(state, now)
            return state, note + effects
        failed, effects = _fail(
            state, f"round {state.round} stage {state.stage.value}: only {k} of the {need} "
                   f"needed {_WHAT[state.stage.value]} arrived before the "
                   f"{_deadline(state) - state.stage_started_at:g} s deadline; nothing released")
        return failed, note + effects
    if state.stage is Stage.FINISHING and now - state.stage_started_at >= p.metrics_timeout_s:
        return _done(state)
    return state, []
