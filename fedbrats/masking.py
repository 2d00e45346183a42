"""Shared definitions of secure aggregation by pairwise masking (``mask`` mode).

Used by both ends: the node (:mod:`node.secagg_client`) and the aggregator
(:mod:`aggregator.secagg`).  The message types carry only public keys, ciphertexts and the
shares the protocol allows to be revealed; the parameter derivations (quantisation after the
bit-budget check, the neighbour graph and its public seed) are what both ends must compute
identically.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

from crypto import quantize as quant
from crypto import secagg
from fedbrats.config import Config
from fedbrats.errors import FedbratsError

MASKED_TENSOR = "masked"
SELF_MASK_SEED = "self_mask_seed"
MASK_KEY = "mask_key"


#: Probability bound that the Skellam noise of a round's sum leaves ``±B`` in *any* coordinate
#: (:func:`skellam_headroom`: a union bound over the coordinates).
HEADROOM_FAILURE_PROB = 2.0**-40


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not ok or not math.isfinite(v) or v <= 0:
        raise FedbratsError(f"{name}: must be a finite number > 0, got {value!r}")
    return v


def _count(name: str, value: Any, *, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise FedbratsError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def integer_noise_variance(C: float, sigma: float, n_sites: int, scale: float, *,
                           max_weight: int = 1, dim: int = 0) -> float:
    """Per-site integer noise variance so that the sum of ``n_sites`` shares carries σ·Δ₂.

    Δ₂ = ``max_weight`` · C · scale (+ √dim for stochastic rounding when ``dim`` > 0) is the L2
    sensitivity of one site's quantised, weighted contribution in integer units; the aggregate
    noise variance is σ²Δ₂², each site's share 1/n of it (Agarwal, Kairouz, Liu, "The Skellam
    Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

    Args:
        C: L2 clipping norm of the float update (weight units).
        sigma: noise multiplier σ of the sum.
        n_sites: shares the sum is guaranteed to contain (use ``federation.min_sites``).
        scale: quantisation scale, integer units per weight unit: ``levels / (2·clip)`` with
            ``levels = 2**bits − 1`` (:class:`crypto.quantize.QuantParams`: ``1 / step``).
        max_weight: the integer weight each site multiplies its quantised update by (1 for
            site-level DP: unequal FedAvg weights scale sensitivity and noise differently).
        dim: number of coordinates d, to include the rounding term √d (0 = leave it out).

    Returns:
        Per-site variance in integer units² (Skellam μ = variance/2).

    Raises:
        FedbratsError: an argument is out of range (names it).
    """
    c = _positive("dp.site_clip", C)
    s = _positive("dp.site_noise_multiplier", sigma)
    n = _count("n_sites", n_sites)
    sc = _positive("scale", scale)
    w = _count("max_weight", max_weight)
    d = _count("dim", dim, minimum=0)
    d2 = w * c * sc + (math.sqrt(d) if d else 0.0)
    return (s * d2) ** 2 / n


def integer_noise_headroom(total_variance: float, failure_prob: float = 2.0**-40) -> int:
    """B with P(|aggregate Skellam noise| > B) ≤ ``failure_prob`` (per coordinate).

    Bernstein's inequality for Sk(μ, μ) (each centred Poisson has variance μ and jumps of 1):
    P(X ≥ t) ≤ exp(−t² / (2(v + t/3))) with v = 2μ, applied to both tails.  The masked sum needs
    this many extra values on both sides of [0, W·L]: add ``ceil(log2(2B + 1))`` bits to the
    budget and decode the total in the centred representative.

    Args:
        total_variance: variance 2μ of the aggregate noise, integer units².
        failure_prob: tail probability per coordinate, in (0, 1).

    Returns:
        B, integer units.
    """
    v = _positive("total_variance", total_variance)
    p = _positive("failure_prob", failure_prob)
    if p >= 1:
        raise FedbratsError(f"failure_prob: must be < 1, got {failure_prob!r}")
    log_term = math.log(2.0 / p)
    # solve t² = 2 log_term (v + t/3)
    b = 2.0 * log_term / 3.0
    t = (b + math.sqrt(b * b + 8.0 * log_term * v)) / 2.0
    return int(math.ceil(t))


def skellam_in_sum(cfg: Config) -> bool:
    """Whether masked sums carry distributed Skellam noise: ``mask`` with ``site-distributed``."""
    return cfg.federation.secure_aggregation == "mask" and "site-distributed" in tuple(cfg.dp.mode)


def skellam_headroom(cfg: Config, dim: int) -> int:
    """Tail bound B (integer units) of the Skellam noise in a round's masked sum.

    Each site adds Sk(μ, μ) of variance :func:`integer_noise_variance` (calibrated so that
    ``federation.min_sites`` shares carry σ = ``dp.site_noise_multiplier`` for the sensitivity
    ``dp.site_clip`` · scale + √dim, scale = ``(2**secagg.bits − 1) / (2·secagg.clip)``); up to
    ``federation.sites`` shares are summed, so the aggregate variance is ``sites`` times one share's.
    B bounds it in every one of the ``dim`` coordinates at once with probability
    1 − :data:`HEADROOM_FAILURE_PROB` (:func:`integer_noise_headroom` at
    ``HEADROOM_FAILURE_PROB / dim`` per coordinate).  The same figure sizes the bit budget
    (:func:`quant_params`) and the aggregator's centred decoding (Agarwal, Kairouz, Liu,
    NeurIPS 2021).

    Args:
        cfg: the federation configuration.
        dim: number of model coordinates d (the masked vector has d + 1 values: the weight).

    Raises:
        FedbratsError: a DP field or ``dim`` is out of range (names it).
    """
    d = _count("dim", dim)
    sa, dp, fed = cfg.secagg, cfg.dp, cfg.federation
    scale = ((1 << int(sa.bits)) - 1) / (2.0 * _positive("secagg.clip", sa.clip))
    per_site = integer_noise_variance(dp.site_clip, dp.site_noise_multiplier,
                                      _count("federation.min_sites", fed.min_sites), scale, dim=d)
    total = per_site * _count("federation.sites", fed.sites)
    return integer_noise_headroom(total, HEADROOM_FAILURE_PROB / d)


def quant_params(cfg: Config, dim: int | None = None) -> quant.QuantParams:
    """The federation's quantisation parameters after the bit-budget check (maybe widened).

    With distributed Skellam noise in the sum (:func:`skellam_in_sum`) the budget also holds the
    noise headroom B = :func:`skellam_headroom` (``noise_headroom``: ``ceil(log2(2B+1))`` more
    bits), which depends on the model dimension: every site and the aggregator must then pass
    the same ``dim`` (the number of model coordinates, without the weight).

    Raises:
        ConfigError: the budget does not fit even 2^64 (states needed vs available bits and the
            noise part).
        FedbratsError: ``dim`` is missing or invalid when the sum carries Skellam noise.
    """
    sa = cfg.secagg
    headroom = 0
    if skellam_in_sum(cfg):
        if dim is None:
            raise FedbratsError("quant_params: dp.mode 'site-distributed' with secure_aggregation "
                                "'mask' puts Skellam noise in the sum, whose headroom depends on "
                                "the model dimension: pass dim (model coordinates)")
        headroom = skellam_headroom(cfg, dim)
    return quant.check_budget(quant.QuantParams(clip=sa.clip, bits=sa.bits,
                                                modulus_bits=sa.modulus_bits,
                                                max_sites=cfg.federation.sites,
                                                max_weight=sa.max_weight,
                                                noise_headroom=headroom), widen=True)


def graph_seed(federation: str, round: int) -> bytes:
    """Public seed of round ``round``'s SecAgg+ neighbour graph: SHA-256 of federation ‖ round.

    Derived, not chosen, so every site can check the graph the aggregator announces.
    """
    return hashlib.sha256(b"fedbrats/v1/graph-seed\x00" + federation.encode() + b"\x00"
                          + round.to_bytes(8, "big")).digest()


def neighbour_graph(cfg: Config, round: int, sites: list[str] | tuple[str, ...]) -> dict[str, frozenset[str]]:
    """Each site's neighbours among ``sites`` (complete graph unless ``secagg.neighbours``)."""
    sites = sorted(sites)
    k = cfg.secagg.neighbours
    if k == 0 or k >= len(sites) - 1:
        return {s: frozenset(t for t in sites if t != s) for s in sites}
    return secagg.neighbours(sites, k=k, seed=graph_seed(cfg.federation.name, round))


@dataclass(frozen=True)
class Advertisement:
    """A site's signed round keys (raw X25519 public keys, Ed25519 signature)."""

    site: str
    mask_public: bytes
    share_public: bytes
    signature: bytes


@dataclass(frozen=True)
class EncryptedShares:
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class RevealedShare:
    owner: str
    kind: str  # SELF_MASK_SEED or MASK_KEY
    x: int
    share: bytes
