"""Privacy accounting at a site: sample-level (DP-SGD), site-level (DP on updates), pure DP (SVT).

Three ledgers, each a small JSON file in the site's state directory (``node.state_dir``), written
atomically (temporary file, ``fsync``, ``os.replace``) after every charge so that a restarted node
continues from the ε it had spent instead of starting from zero:

===================== ============================ =========================================
file                  class                        guarantee
===================== ============================ =========================================
``dp_sample.json``    :class:`SampleLevelAccountant` (ε, δ) w.r.t. one patient (case), DP-SGD
``dp_site.json``      :class:`SiteLevelAccountant`   (ε, δ) w.r.t. one site's whole update
``dp_pure.json``      :class:`PureDPAccountant`      ε (δ = 0) of the SVT releases, summed
===================== ============================ =========================================

**Sample-level** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every
DP-SGD step is a Poisson-subsampled Gaussian mechanism with sampling rate q = B/N and noise
multiplier σ.  :class:`SampleLevelAccountant` keeps the history ``[(σ, q, steps), ...]`` over *all*
rounds (one accountant for the site's lifetime, whatever the optimiser or process) and evaluates it
with Opacus' RDP accountant (Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar,
Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, 2019)
or its PRV accountant (Gopi, Lee, Wutschitz, NeurIPS 2021) when ``dp.accountant = "prv"``.

**Site-level** (McMahan et al. ICLR 2018 style user-level DP, here one "user" = one site): every
round a site's update is clipped to ‖Δ‖₂ ≤ C and Gaussian noise of standard deviation σC is
present in what the adversary sees (the site's own update in ``site-local`` mode, the sum in
``site-distributed`` mode).  Rounds compose; with site sampling rate ``q_site`` < 1 the
subsampled-Gaussian RDP of Mironov et al. 2019 applies (q_site = 1 for full participation; note
that amplification only holds against an adversary who does not learn *which* sites took part,
which the aggregator does learn).  :func:`gaussian_rdp` is α/(2σ²) exactly for q = 1 and
:func:`opacus.accountants.analysis.rdp.compute_rdp` otherwise; :func:`rdp_to_epsilon` uses the
same conversion as Opacus' ``get_privacy_spent`` (Balle et al., AISTATS 2020, Thm. 21):
ε = min_α [ RDP(α) − (log δ + log α)/(α − 1) + log((α − 1)/α) ].  Google's ``dp_accounting``
(``RdpAccountant`` + ``PoissonSampledDpEvent(GaussianDpEvent)``) uses the identical conversion;
its RDP of the subsampled Gaussian equals Opacus' at integer orders, while at fractional orders
it sums the absolute values of the alternating series of Mironov et al. (Sec. 3.3), an upper
bound that differs in the 4th–5th significant digit (σ=1.5, q=0.04, 2250 steps, δ=1e-5: Opacus
7.32911, dp_accounting 7.32933).

**Integer (Skellam) noise** for masked aggregation (Agarwal, Kairouz, Liu, "The Skellam
Mechanism for Differentially Private Federated Learning", NeurIPS 2021): :func:`skellam_rdp`.

**Pure DP**: the sparse vector technique (Lyu, Su, Li, VLDB 2017) is ε-DP per round; rounds add
up (basic composition), :class:`PureDPAccountant`.

:func:`privacy_report` reads the ledgers of a state directory and :func:`format_report` renders
them for ``fedbrats privacy report --site-state DIR``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbrats.errors import FedbratsError

__all__ = [
    "ACCOUNTANT_FORMAT",
    "DEFAULT_ORDERS",
    "PURE_STATE_FILE",
    "SAMPLE_STATE_FILE",
    "SITE_STATE_FILE",
    "AccountantStateError",
    "PrivacyBudgetExceeded",
    "PureDPAccountant",
    "SampleLevelAccountant",
    "SiteLevelAccountant",
    "format_report",
    "gaussian_rdp",
    "load_accountant",
    "privacy_report",
    "rdp_to_epsilon",
    "skellam_epsilon",
    "skellam_rdp",
    "subsampled_gaussian_rdp",
]

ACCOUNTANT_FORMAT = "fedbrats-dp-accountant/1"
"""Format tag of every ledger file; a file with another tag is refused."""

SAMPLE_STATE_FILE = "dp_sample.json"
"""Sample-level (DP-SGD) ledger, in the site's state directory."""

SITE_STATE_FILE = "dp_site.json"
"""Site-level (update noise) ledger, in the site's state directory."""

PURE_STATE_FILE = "dp_pure.json"
"""Pure-DP (SVT) ledger, in the site's state directory."""

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""RDP orders α: Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (1.1 … 10.9, 12 … 63)."""

ACCOUNTANT_MECHANISMS = ("rdp", "prv")
"""Sample-level accountants available (``dp.accountant``)."""


# ---------------------------------------------------------------------------------------------
# Errors


class AccountantStateError(FedbratsError):
    """A ledger file is unreadable, of another format or kind, or holds invalid entries.

    A damaged ledger is never replaced by an empty one: that would silently reset ε to 0.
    """


class PrivacyBudgetExceeded(FedbratsError):
    """A round would take the site's ε above its budget; the round was refused, nothing charged.

    Attributes:
        site: site id ('' when unknown).
        round: the refused federated round.
        spent: ε spent before the round.
        would_be: ε after the round, had it run.
        budget: the configured budget (``dp.epsilon_budget``).
        delta: δ the ε values refer to.
        mechanism: which guarantee (``sample-level``, ``site-level``, ``pure-dp``).
    """

    exit_code = 8

    def __init__(self, *, site: str, round: int, spent: float, would_be: float, budget: float,
                 delta: float, mechanism: str = "sample-level") -> None:
        self.site, self.round = site, int(round)
        self.spent, self.would_be, self.budget = float(spent), float(would_be), float(budget)
        self.delta, self.mechanism = float(delta), mechanism
        who = f"site {site}: " if site else ""
        super().__init__(
            f"{who}round {round}: refused: {mechanism} privacy budget exceeded: spent ε = {spent:.4f}, "
            f"this round would reach ε = {would_be:.4f} > dp.epsilon_budget = {budget:g} "
            f"(δ = {delta:g}); nothing was trained or charged"
        )


# ---------------------------------------------------------------------------------------------
# RDP building blocks


def _orders(orders: Iterable[float] | None) -> np.ndarray:
    arr = np.asarray(DEFAULT_ORDERS if orders is None else list(orders), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise FedbratsError(f"RDP orders: need a non-empty list of finite orders > 1, got {orders!r}")
    return arr


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not ok or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise FedbratsError(f"{name}: must be a finite number {bound}, got {value!r}")
    return v


def _check_rate(name: str, value: Any) -> float:
    v = _check_positive(name, value)
    if v > 1:
        raise FedbratsError(f"{name}: a sampling rate must lie in (0, 1], got {value!r}")
    return v


def _check_delta(delta: Any, name: str = "delta") -> float:
    v = _check_positive(name, delta)
    if v >= 1:
        raise FedbratsError(f"{name}: must lie in (0, 1), got {delta!r}")
    return v


def _check_steps(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise FedbratsError(f"{name}: must be an integer >= 0, got {value!r}")
    return int(value)


def gaussian_rdp(noise_multiplier: float, orders: Iterable[float] | None = None) -> np.ndarray:
    """RDP of one Gaussian mechanism (Mironov 2017, Prop. 7): ε(α) = α / (2σ²), exactly.

    Args:
        noise_multiplier: σ = noise standard deviation / L2 sensitivity (> 0).
        orders: RDP orders α > 1 (default :data:`DEFAULT_ORDERS`).

    Returns:
        ``(len(orders),)`` float64 array of RDP values (nats).

    Raises:
        FedbratsError: σ not > 0 or orders invalid.
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    a = _orders(orders)
    return a / (2.0 * sigma * sigma)


def subsampled_gaussian_rdp(noise_multiplier: float, sample_rate: float, steps: int = 1,
                            orders: Iterable[float] | None = None) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    q = 1 is the plain Gaussian (:func:`gaussian_rdp`, α/(2σ²) per step); q < 1 uses Opacus'
    ``compute_rdp`` (Mironov, Talwar, Zhang 2019, Sec. 3.3; exact series at integer α, the
    signed series at fractional α).

    Args:
        noise_multiplier: σ (> 0).
        sample_rate: Poisson sampling probability q in (0, 1].
        steps: number of compositions (>= 0).
        orders: RDP orders α > 1 (default :data:`DEFAULT_ORDERS`).

    Returns:
        ``(len(orders),)`` float64 RDP values (nats), ``steps`` × the one-step curve.

    Raises:
        FedbratsError: an argument is out of range.
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    q = _check_rate("sample_rate", sample_rate)
    n = _check_steps("steps", steps)
    a = _orders(orders)
    if n == 0:
        return np.zeros_like(a)
    if q == 1.0:
        return n * a / (2.0 * sigma * sigma)
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=list(a)), dtype=np.float64)


def rdp_to_epsilon(orders: Iterable[float], rdp: Iterable[float], delta: float) -> tuple[float, float]:
    """Convert an RDP curve to (ε, δ)-DP: the conversion of Opacus' ``get_privacy_spent``.

    ε = min over α of ``rdp(α) − (log δ + log α)/(α − 1) + log((α − 1)/α)`` (Balle, Barthe,
    Gaboardi, Hsu, Sato, "Hypothesis Testing Interpretations and Rényi Differential Privacy",
    AISTATS 2020, Thm. 21); ``dp_accounting.rdp.compute_epsilon`` uses the same bound.

    Args:
        orders: RDP orders α > 1.
        rdp: RDP value at each order (nats; ``inf`` allowed).
        delta: target δ in (0, 1).

    Returns:
        ``(epsilon, best_order)``; ``(0.0, nan)`` when every RDP value is 0, ``(inf, nan)`` when
        every value is infinite.

    Raises:
        FedbratsError: lengths differ, δ out of range.
    """
    a = _orders(orders)
    r = np.asarray(list(rdp), dtype=np.float64)
    d = _check_delta(delta)
    if r.shape != a.shape:
        raise FedbratsError(f"rdp_to_epsilon: {a.size} orders but {r.size} RDP values")
    if np.all(r == 0):
        return 0.0, math.nan
    with np.errstate(invalid="ignore"):
        eps = r - (math.log(d) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    if not math.isfinite(eps[i]):
        return math.inf, math.nan
    return max(0.0, float(eps[i])), float(a[i])


def skellam_rdp(orders: Iterable[float] | None, *, l2_sensitivity: float, l1_sensitivity: float,
                mu: float) -> np.ndarray:
    """RDP of the multi-dimensional Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021).

    Noise Sk(μ, μ) (difference of two Poisson(μ) variables, variance 2μ) is added to every
    coordinate of an integer vector whose L2 / L1 sensitivities are Δ₂ / Δ₁.  Agarwal et al.
    (Thm. 3.5) bound its RDP by::

        ε(α) ≤ α Δ₂² / (4μ) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (16 μ²),  3 Δ₁ / (4μ) )

    We use 2α in place of 2α − 1 (larger, hence still an upper bound).  The first term is the
    Gaussian RDP α/(2σ²) with σ² = 2μ/Δ₂²; for the large μ of fine quantisation the correction
    is negligible.  For a *sum* over n sites, each adding Sk(μᵢ, μᵢ), μ = Σ μᵢ.

    Args:
        orders: RDP orders α > 1 (None = :data:`DEFAULT_ORDERS`).
        l2_sensitivity: Δ₂ in integer units (> 0).
        l1_sensitivity: Δ₁ in integer units (> 0; ≤ √d · Δ₂).
        mu: total Skellam parameter μ (> 0), i.e. half the total noise variance.

    Returns:
        ``(len(orders),)`` RDP values (nats) of one release.
    """
    a = _orders(orders)
    d2 = _check_positive("l2_sensitivity", l2_sensitivity)
    d1 = _check_positive("l1_sensitivity", l1_sensitivity)
    m = _check_positive("mu", mu)
    gauss = a * d2 * d2 / (4.0 * m)
    corr = np.minimum((2.0 * a * d2 * d2 + 6.0 * d1) / (16.0 * m * m), 3.0 * d1 / (4.0 * m))
    return gauss + corr


def skellam_epsilon(*, l2_sensitivity: float, l1_sensitivity: float, mu: float, rounds: int,
                    delta: float, orders: Iterable[float] | None = None) -> float:
    """(ε, δ) of ``rounds`` Skellam releases (:func:`skellam_rdp` composed, then converted).

    Returns:
        ε (float).
    """
    rdp = skellam_rdp(orders, l2_sensitivity=l2_sensitivity, l1_sensitivity=l1_sensitivity, mu=mu)
    return rdp_to_epsilon(_orders(orders), rdp * _check_steps("rounds", rounds), delta)[0]


# ---------------------------------------------------------------------------------------------
# Ledger files


def _atomic_write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise AccountantStateError(f"{path}: privacy ledger is unreadable ({exc}); refusing to "
                                   f"continue with an unknown ε (restore the file from a backup)") from exc
    if not isinstance(raw, dict) or raw.get("format") != ACCOUNTANT_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise AccountantStateError(f"{path}: not a fedbrats privacy ledger (format {got!r}, "
                                   f"expected {ACCOUNTANT_FORMAT!r})")
    if raw.get("kind") != kind:
        raise AccountantStateError(f"{path}: holds a {raw.get('kind')!r} ledger, expected {kind!r}")
    return raw


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class _Ledger:
    """Shared parts: site id, δ, budget, free-form mechanism parameters, per-round records."""

    kind = ""

    def __init__(self, *, site: str = "", delta: float | None = None, budget: float = 0.0,
                 params: Mapping[str, Any] | None = None) -> None:
        self.site = str(site)
        self.delta = None if delta is None else _check_delta(delta)
        self.budget = _check_positive("epsilon_budget", budget, allow_zero=True)
        self.params: dict[str, Any] = dict(params or {})
        self.rounds: list[dict[str, Any]] = []

    # subclasses: _state() -> dict, _load(dict, where)

    def state_dict(self) -> dict[str, Any]:
        """The ledger as a JSON-serialisable dict (format, kind, site, δ, budget, params, rounds, ...)."""
        out = {"format": ACCOUNTANT_FORMAT, "kind": self.kind, "site": self.site,
               "delta": self.delta, "budget": self.budget, "params": _jsonable(self.params)}
        out.update(self._state())
        out["rounds"] = _jsonable(self.rounds)
        return out

    def load_state_dict(self, state: Mapping[str, Any], *, where: str = "state") -> None:
        """Replace this ledger's contents with ``state`` (from :meth:`state_dict`).

        Raises:
            AccountantStateError: wrong format/kind or invalid entries (names ``where``).
        """
        if not isinstance(state, Mapping) or state.get("format") != ACCOUNTANT_FORMAT \
                or state.get("kind") != self.kind:
            raise AccountantStateError(f"{where}: not a {self.kind!r} ledger of format {ACCOUNTANT_FORMAT!r}")
        try:
            rounds = [dict(r) for r in state.get("rounds", [])]
            self._load(state, where)
        except AccountantStateError:
            raise
        except (TypeError, ValueError, KeyError, FedbratsError) as exc:
            raise AccountantStateError(f"{where}: invalid {self.kind} ledger entry: {exc}") from exc
        self.rounds = rounds
        if state.get("site"):
            self.site = str(state["site"])
        if self.delta is None and state.get("delta") is not None:
            self.delta = _check_delta(state["delta"])
        if not self.params and state.get("params"):
            self.params = dict(state["params"])
        if not self.budget and state.get("budget"):
            self.budget = float(state["budget"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger to ``path`` atomically (JSON; parent folders are created)."""
        _atomic_write_json(Path(path), self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        """Replace this ledger's contents with the file at ``path``.

        Raises:
            FileNotFoundError: no such file (a fresh site).
            AccountantStateError: the file is damaged or of another kind.
        """
        self.load_state_dict(_read_json(Path(path), self.kind), where=str(path))

    def _delta(self, delta: float | None) -> float:
        d = self.delta if delta is None else delta
        if d is None:
            raise FedbratsError(f"{self.kind} accountant: no δ given and none configured")
        return _check_delta(d)


def _history_entries(raw: Any) -> list[tuple[float, float, int]]:
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise AccountantStateError(f"history[{i}]: expected [noise_multiplier, sample_rate, steps], got {entry!r}")
        sigma = _check_positive(f"history[{i}].noise_multiplier", entry[0])
        q = _check_rate(f"history[{i}].sample_rate", entry[1])
        n = _check_steps(f"history[{i}].steps", entry[2])
        out.append((sigma, q, n))
    return out


def _push(history: list[tuple[float, float, int]], sigma: float, q: float, steps: int) -> None:
    """Append (σ, q, steps), merging with the last entry when σ and q are equal (as Opacus does)."""
    if steps == 0:
        return
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, history[-1][2] + steps)
    else:
        history.append((sigma, q, steps))


# ---------------------------------------------------------------------------------------------
# Sample level


class SampleLevelAccountant(_Ledger):
    """One DP-SGD accountant for a site's whole lifetime (all rounds, optimisers and restarts).

    Holds the Opacus-style history ``[(σ, q, steps), ...]`` and evaluates it with Opacus'
    ``RDPAccountant`` (``mechanism="rdp"``, default orders :data:`DEFAULT_ORDERS`) or
    ``PRVAccountant`` (``"prv"``; where PRV's numerical composition fails — tiny σ — the RDP
    bound, valid but looser, is returned).  Because only the history is stored, a ledger written
    by one mechanism can be re-evaluated by the other.

    Args:
        mechanism: ``rdp`` or ``prv`` (``dp.accountant``).
        site: site id, for messages and the report.
        delta: default δ of :meth:`epsilon` (``dp.delta``).
        budget: ``dp.epsilon_budget`` (0 = none); recorded for the report.
        params: mechanism parameters for the report (C, batch size, cases, grad-sample mode ...).

    Raises:
        FedbratsError: unknown mechanism or invalid δ / budget.
    """

    kind = "sample-level"

    def __init__(self, mechanism: str = "rdp", *, site: str = "", delta: float | None = None,
                 budget: float = 0.0, params: Mapping[str, Any] | None = None) -> None:
        if mechanism not in ACCOUNTANT_MECHANISMS:
            raise FedbratsError(f"dp.accountant: must be one of {ACCOUNTANT_MECHANISMS}, got {mechanism!r}")
        super().__init__(site=site, delta=delta, budget=budget, params=params)
        self.mechanism = mechanism
        self._history: list[tuple[float, float, int]] = []

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps), ...]`` (a copy)."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total DP-SGD steps charged."""
        return sum(n for _, _, n in self._history)

    def __len__(self) -> int:
        return self.steps

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Charge ``steps`` steps of the subsampled Gaussian mechanism (σ, q).

        Raises:
            FedbratsError: σ not > 0, q not in (0, 1], steps < 0.
        """
        _push(self._history, _check_positive("noise_multiplier", noise_multiplier),
              _check_rate("sample_rate", sample_rate), _check_steps("steps", steps))

    def _epsilon_of(self, history: Sequence[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        from opacus.accountants import PRVAccountant, RDPAccountant

        if self.mechanism == "prv":
            acc = PRVAccountant()
            acc.history = [tuple(h) for h in history]
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    eps = float(acc.get_epsilon(delta=delta))
            except (ValueError, FloatingPointError, ArithmeticError):
                eps = math.nan
            if math.isfinite(eps):
                return eps
            # PRV's discretisation fails for extreme (tiny σ) configurations; RDP is a valid
            # (looser) upper bound of the same mechanism.
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in history]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for tiny ε
            eps, _ = acc.get_privacy_spent(delta=delta, alphas=list(DEFAULT_ORDERS))
        return float(eps)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the configured δ); 0.0 before any step."""
        return self._epsilon_of(self._history, self._delta(delta))

    def would_be_epsilon(self, extra_steps: int, delta: float | None = None, *,
                         noise_multiplier: float | None = None, sample_rate: float | None = None) -> float:
        """ε after ``extra_steps`` more steps, without charging them.

        Args:
            extra_steps: planned further steps (>= 0).
            delta: δ (default: the configured δ).
            noise_multiplier: σ of the planned steps (default: the last charged σ).
            sample_rate: q of the planned steps (default: the last charged q).

        Raises:
            FedbratsError: σ / q not given and nothing charged yet, or out of range.
        """
        n = _check_steps("extra_steps", extra_steps)
        if noise_multiplier is None or sample_rate is None:
            if not self._history:
                raise FedbratsError("would_be_epsilon: give noise_multiplier and sample_rate "
                                    "(nothing charged yet)")
            noise_multiplier = self._history[-1][0] if noise_multiplier is None else noise_multiplier
            sample_rate = self._history[-1][1] if sample_rate is None else sample_rate
        history = list(self._history)
        _push(history, _check_positive("noise_multiplier", noise_multiplier),
              _check_rate("sample_rate", sample_rate), n)
        return self._epsilon_of(history, self._delta(delta))

    def record_round(self, round: int, **info: Any) -> None:
        """Append a per-round record (round, steps, σ, q, ε after ...) for the report."""
        self.rounds.append({"round": int(round), **info})

    def _state(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self._history],
                "steps": self.steps}

    def _load(self, state: Mapping[str, Any], where: str) -> None:
        mech = state.get("mechanism", self.mechanism)
        if mech not in ACCOUNTANT_MECHANISMS:
            raise AccountantStateError(f"{where}: unknown mechanism {mech!r}")
        self._history = _history_entries(state.get("history", []))


# ---------------------------------------------------------------------------------------------
# Site level


class SiteLevelAccountant(_Ledger):
    """RDP accountant of the site-level Gaussian mechanism on clipped updates, over rounds.

    Each round charges the (subsampled) Gaussian mechanism with noise multiplier σ (noise std /
    clip C) and site sampling rate ``q_site`` (1.0 = every site takes part every round).  The RDP
    curve is our own: :func:`gaussian_rdp` for q = 1, :func:`subsampled_gaussian_rdp` otherwise;
    conversion by :func:`rdp_to_epsilon`.

    Args:
        orders: RDP orders (default :data:`DEFAULT_ORDERS`).
        site, delta, budget, params: as in :class:`SampleLevelAccountant` (δ = ``dp.site_delta``).
    """

    kind = "site-level"

    def __init__(self, *, orders: Iterable[float] | None = None, site: str = "",
                 delta: float | None = None, budget: float = 0.0,
                 params: Mapping[str, Any] | None = None) -> None:
        super().__init__(site=site, delta=delta, budget=budget, params=params)
        self.orders = _orders(orders)
        self._history: list[tuple[float, float, int]] = []
        self._skellam: list[tuple[float, float, float, int]] = []

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, rounds), ...]`` (a copy)."""
        return list(self._history)

    @property
    def skellam_history(self) -> list[tuple[float, float, float, int]]:
        """``[(l2_sensitivity, l1_sensitivity, mu, rounds), ...]`` of Skellam releases (a copy)."""
        return list(self._skellam)

    @property
    def releases(self) -> int:
        """Rounds charged (Gaussian and Skellam)."""
        return sum(n for _, _, n in self._history) + sum(n for *_, n in self._skellam)

    def step_skellam(self, l2_sensitivity: float, l1_sensitivity: float, mu: float, rounds: int = 1) -> None:
        """Charge ``rounds`` aggregate Skellam releases Sk(μ, μ) (:func:`skellam_rdp`, exact bound).

        Args:
            l2_sensitivity, l1_sensitivity: Δ₂, Δ₁ of one site's integer contribution.
            mu: total Skellam parameter of the aggregate noise (variance 2μ).
            rounds: number of releases.
        """
        entry = (_check_positive("l2_sensitivity", l2_sensitivity), _check_positive("l1_sensitivity", l1_sensitivity),
                 _check_positive("mu", mu), _check_steps("rounds", rounds))
        if entry[3] == 0:
            return
        if self._skellam and self._skellam[-1][:3] == entry[:3]:
            last = self._skellam[-1]
            self._skellam[-1] = (last[0], last[1], last[2], last[3] + entry[3])
        else:
            self._skellam.append(entry)

    def step(self, noise_multiplier: float, sample_rate: float = 1.0, rounds: int = 1) -> None:
        """Charge ``rounds`` releases with noise multiplier σ at site sampling rate q."""
        _push(self._history, _check_positive("noise_multiplier", noise_multiplier),
              _check_rate("sample_rate", sample_rate), _check_steps("rounds", rounds))

    def _rdp_of(self, history: Sequence[tuple[float, float, int]]) -> np.ndarray:
        total = np.zeros_like(self.orders)
        for sigma, q, n in history:
            total = total + subsampled_gaussian_rdp(sigma, q, n, self.orders)
        for l2, l1, mu, n in self._skellam:
            total = total + n * skellam_rdp(self.orders, l2_sensitivity=l2, l1_sensitivity=l1, mu=mu)
        return total

    def rdp(self) -> np.ndarray:
        """Composed RDP curve at :attr:`orders` (nats)."""
        return self._rdp_of(self._history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent at ``delta`` (default: the configured δ)."""
        return rdp_to_epsilon(self.orders, self.rdp(), self._delta(delta))[0]

    def would_be_epsilon(self, extra_rounds: int = 1, delta: float | None = None, *,
                         noise_multiplier: float | None = None, sample_rate: float = 1.0) -> float:
        """ε after ``extra_rounds`` more releases (σ defaults to the last charged), uncharged."""
        if noise_multiplier is None:
            if not self._history:
                raise FedbratsError("would_be_epsilon: give noise_multiplier (nothing charged yet)")
            noise_multiplier = self._history[-1][0]
        history = list(self._history)
        _push(history, _check_positive("noise_multiplier", noise_multiplier),
              _check_rate("sample_rate", sample_rate), _check_steps("extra_rounds", extra_rounds))
        return rdp_to_epsilon(self.orders, self._rdp_of(history), self._delta(delta))[0]

    def record_round(self, round: int, **info: Any) -> None:
        """Append a per-round record for the report."""
        self.rounds.append({"round": int(round), **info})

    def _state(self) -> dict[str, Any]:
        return {"mechanism": "gaussian-rdp", "orders": [float(a) for a in self.orders],
                "history": [list(h) for h in self._history],
                "skellam_history": [list(h) for h in self._skellam], "releases": self.releases}

    def _load(self, state: Mapping[str, Any], where: str) -> None:
        if state.get("orders"):
            self.orders = _orders(state["orders"])
        self._history = _history_entries(state.get("history", []))
        sk = []
        for i, e in enumerate(state.get("skellam_history", [])):
            if not isinstance(e, (list, tuple)) or len(e) != 4:
                raise AccountantStateError(f"skellam_history[{i}]: expected [l2, l1, mu, rounds], got {e!r}")
            sk.append((_check_positive("l2", e[0]), _check_positive("l1", e[1]), _check_positive("mu", e[2]),
                       _check_steps("rounds", e[3])))
        self._skellam = sk


# ---------------------------------------------------------------------------------------------
# Pure DP


class PureDPAccountant(_Ledger):
    """Basic composition of pure ε-DP releases (the SVT, Lyu et al. 2017): ε_total = Σ ε_round.

    Args:
        site, budget, params: as in :class:`SampleLevelAccountant` (δ is 0).
    """

    kind = "pure-dp"

    def __init__(self, *, site: str = "", budget: float = 0.0,
                 params: Mapping[str, Any] | None = None) -> None:
        super().__init__(site=site, delta=None, budget=budget, params=params)
        self._charges: list[float] = []

    def step(self, epsilon: float, round: int | None = None) -> None:
        """Charge one ε-DP release (``round`` is recorded for the report)."""
        e = _check_positive("epsilon", epsilon)
        self._charges.append(e)
        if round is not None:
            self.rounds.append({"round": int(round), "epsilon": e, "epsilon_total": self.epsilon()})

    def epsilon(self, delta: float | None = None) -> float:
        """Σ ε over the releases so far (δ is ignored: pure DP)."""
        return float(math.fsum(self._charges))

    def would_be_epsilon(self, epsilon: float) -> float:
        """ε after one more ε-release, uncharged."""
        return self.epsilon() + _check_positive("epsilon", epsilon)

    @property
    def releases(self) -> int:
        """Releases charged."""
        return len(self._charges)

    def _state(self) -> dict[str, Any]:
        return {"mechanism": "basic-composition", "charges": list(self._charges)}

    def _load(self, state: Mapping[str, Any], where: str) -> None:
        self._charges = [_check_positive(f"charges[{i}]", c) for i, c in enumerate(state.get("charges", []))]


_KINDS = {SAMPLE_STATE_FILE: SampleLevelAccountant, SITE_STATE_FILE: SiteLevelAccountant,
          PURE_STATE_FILE: PureDPAccountant}


def load_accountant(path: str | os.PathLike) -> SampleLevelAccountant | SiteLevelAccountant | PureDPAccountant:
    """Load any ledger file (its ``kind`` field picks the class).

    Raises:
        FileNotFoundError: no such file.
        AccountantStateError: damaged or unknown ledger.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise AccountantStateError(f"{p}: privacy ledger is unreadable ({exc})") from exc
    kind = raw.get("kind") if isinstance(raw, dict) else None
    cls = {c.kind: c for c in _KINDS.values()}.get(kind)
    if cls is None:
        raise AccountantStateError(f"{p}: unknown privacy ledger kind {kind!r}")
    acc = cls(mechanism=raw.get("mechanism", "rdp")) if cls is SampleLevelAccountant else cls()
    acc.load_state_dict(raw, where=str(p))
    return acc


# ---------------------------------------------------------------------------------------------
# Report


def privacy_report(state_dir: str | os.PathLike) -> dict[str, Any]:
    """What a site has spent, from the ledgers in its state directory.

    Args:
        state_dir: the site's ``node.state_dir``.

    Returns:
        ``{"state_dir": str, "site": str, "guarantees": [entry, ...]}`` with one entry per ledger
        present (sample-level, site-level, pure-dp), each::

            {"kind", "file", "mechanism", "epsilon", "delta", "budget", "budget_left",
             "steps" or "releases", "history", "params", "rounds"}

        ``budget`` / ``budget_left`` are None when no budget is set.  No ledger = empty list.

    Raises:
        FedbratsError: ``state_dir`` is not a directory.
        AccountantStateError: a ledger is damaged (never reported as ε = 0).
    """
    d = Path(state_dir)
    if not d.is_dir():
        raise FedbratsError(f"--site-state {d}: not a directory")
    entries = []
    site = ""
    for name in (SAMPLE_STATE_FILE, SITE_STATE_FILE, PURE_STATE_FILE):
        path = d / name
        if not path.exists():
            continue
        acc = load_accountant(path)
        site = site or acc.site
        delta = 0.0 if isinstance(acc, PureDPAccountant) else acc.delta
        eps = acc.epsilon() if isinstance(acc, PureDPAccountant) else (acc.epsilon(delta) if delta else math.nan)
        budget = acc.budget or None
        entry: dict[str, Any] = {
            "kind": acc.kind,
            "file": str(path),
            "mechanism": getattr(acc, "mechanism", "gaussian-rdp") if not isinstance(acc, PureDPAccountant)
            else "basic-composition",
            "epsilon": eps,
            "delta": delta,
            "budget": budget,
            "budget_left": None if budget is None else max(0.0, budget - eps),
            "params": dict(acc.params),
            "rounds": list(acc.rounds),
        }
        if isinstance(acc, SampleLevelAccountant):
            entry["steps"] = acc.steps
            entry["history"] = [list(h) for h in acc.history]
        elif isinstance(acc, SiteLevelAccountant):
            entry["releases"] = acc.releases
            entry["history"] = [list(h) for h in acc.history]
            if acc.skellam_history:
                entry["skellam_history"] = [list(h) for h in acc.skellam_history]
        else:
            entry["releases"] = acc.releases
        entries.append(entry)
    return {"state_dir": str(d), "site": site, "guarantees": entries}


_TITLES = {"sample-level": "sample-level DP-SGD (one patient)",
           "site-level": "site-level update noise (one site's update)",
           "pure-dp": "pure DP, sparse vector technique"}

#: Explanations printed after a mechanism parameter of the same name.
_PARAM_NOTES = {"n_sites": "n_sites = shares the noise is calibrated for (federation.min_sites)"}


def _ledger_dirs_below(d: Path, depth: int = 2) -> list[Path]:
    """Folders up to ``depth`` levels below ``d`` that hold a privacy ledger."""
    names = (SAMPLE_STATE_FILE, SITE_STATE_FILE, PURE_STATE_FILE)
    found, frontier = [], [d]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            try:
                subs = sorted(p for p in f.iterdir() if p.is_dir())
            except OSError:
                continue
            for p in subs:
                if any((p / n).exists() for n in names):
                    found.append(p)
                nxt.append(p)
        frontier = nxt
    return found


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """Render :func:`privacy_report`'s dict as text for ``fedbrats privacy report``.

    Returns:
        Multi-line text: a header naming site and folder, then per guarantee ε spent, δ, budget
        and budget left, the steps / releases and the mechanism parameters; "no privacy ledger"
        when none exists.  Never contains update values or patient data.
    """
    site = report.get("site") or "?"
    lines = [f"privacy report: site {site} ({report.get('state_dir', '?')})"]
    entries = report.get("guarantees") or []
    if not entries:
        below = _ledger_dirs_below(Path(str(report.get("state_dir", "."))))
        if below:
            lines.append("  no privacy ledger in this folder; site state folders with ledgers below it:")
            lines += [f"    {p}" for p in below[:20]]
            lines.append("  pass one of them as --site-state (a simulation keeps them in OUT/sites/SITE)")
        else:
            lines.append("  no privacy ledger found: no DP mechanism has run with this folder as "
                         "node.state_dir (a simulation keeps each site's in OUT/sites/SITE)")
        return "\n".join(lines)
    for e in entries:
        lines.append("")
        mech = e.get("mechanism")
        if e.get("skellam_history"):  # distributed Skellam noise under masking
            mech = "skellam-rdp" if not e.get("history") else f"{mech} + skellam-rdp"
        lines.append(f"{_TITLES.get(e.get('kind'), e.get('kind'))}  [{mech}]")
        eps, delta = e.get("epsilon"), e.get("delta")
        lines.append(f"  epsilon spent : {_fmt(eps)}" + (f"   (delta = {delta:g})" if delta else "   (delta = 0)"))
        budget = e.get("budget")
        if budget:
            left = e.get("budget_left")
            lines.append(f"  budget        : {_fmt(budget)}   left {_fmt(left)}")
        else:
            lines.append("  budget        : none set")
        if "steps" in e:
            lines.append(f"  DP-SGD steps  : {e['steps']}")
        if "releases" in e:
            lines.append(f"  releases      : {e['releases']}")
        for sigma, q, n in e.get("history") or []:
            lines.append(f"    noise multiplier {sigma:.4g}, sampling rate {q:.4g}, x{n}")
        for l2, l1, mu, n in e.get("skellam_history") or []:
            lines.append(f"    Skellam mu {mu:.4g}, L2 sensitivity {l2:.4g}, L1 sensitivity {l1:.4g}, x{n}")
        params = e.get("params") or {}
        if params:
            lines.append("  parameters    : " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
            lines += [f"                  ({note})" for k, note in _PARAM_NOTES.items() if k in params]
        rounds = e.get("rounds") or []
        if rounds:
            last = rounds[-1]
            lines.append(f"  rounds        : {len(rounds)} recorded, last round {last.get('round')}")
    return "\n".join(lines)
