"""Fixed-point quantisation of float updates for masked sums modulo ``2**modulus_bits``.

A site maps each coordinate ``x`` of its update to an integer ``q`` in ``[0, L]`` with
``L = 2**bits - 1``::

    x_c  = clip(x, -clip, +clip)                 # values beyond the range are counted
    v    = (x_c + clip) / step,   step = 2 * clip / L      # v in [0, L]
    q    = floor(v) + [u < v - floor(v)],   u ~ U[0, 1)    # stochastic rounding

and sends ``w * q`` (its integer weight ``w``, e.g. its sample count, times ``q``), masked.  The
aggregator recovers ``T = sum_i w_i q_i`` exactly, provided it never wraps modulo
``2**modulus_bits`` -- which :func:`check_budget` guarantees -- and :func:`dequantize_sum` returns
the weighted mean ``T * step / W - clip`` with ``W = sum_i w_i``.

Error bound: stochastic rounding is unbiased (``E[q] = v``) and moves each value by less than one
step, so per coordinate ``|mean - weighted mean of the clipped values| < step = 2 * clip / L``
(a weighted average of errors each below one step), and the expectation of ``mean`` is exactly the
weighted mean of the clipped values.  Clipping is the only other change, and it is counted.

Bit budget: the largest possible total is ``max_sites * max_weight * L``, which needs
``bits + ceil(log2(max_sites * max_weight))`` bits.  One more *guard bit* is required so that a
total that is out of range (masks that did not cancel, a site that lied about its weight, a
corrupted sum) lands above ``W * L`` and is detected by :func:`dequantize_sum` instead of
silently decoding to a wrong average::

    needed = bits + ceil(log2(max_sites * max_weight)) + 1  <=  modulus_bits

When the sum also carries signed DP noise within ``±B`` (``QuantParams.noise_headroom``, e.g.
distributed Skellam noise), ``ceil(log2(2B + 1))`` more bits are needed and the sum is decoded in
the centred representative (:meth:`aggregator.secagg.MaskedRound.unmask`).

If a 32-bit modulus is too small, :func:`check_budget` widens it to 64 bits (when allowed) or
refuses the configuration, stating needed vs available bits.

The rounding randomness need not be cryptographic, but it is explicit and deterministic under a
seed: ``numpy.random.Generator(PCG64(seed))``, never numpy's global state.  Sites pass a fresh
random seed per round.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from crypto.errors import CryptoInputError
from crypto.primitives import _run_ranges, _split_range, worker_threads
from fedbrats.errors import ConfigError

__all__ = ["GUARD_BITS", "QuantParams", "bits_needed", "check_budget", "dequantize_sum", "noise_bits", "quantize"]

#: Extra bits required beyond the largest possible total (see the module docstring).
GUARD_BITS = 1
#: Largest supported value bit width (float64 holds these integers exactly).
MAX_VALUE_BITS = 48
_SOURCE = "secure aggregation quantisation"
#: Values quantised per slice: four reused buffers of this many values (~1.6 MiB together)
#: stay in the CPU caches.  The output does not depend on it.
_CHUNK = 1 << 16


@dataclass(frozen=True)
class QuantParams:
    """Quantisation and modulus parameters shared by every site and the aggregator.

    Attributes:
        clip: values are clipped to ``[-clip, clip]`` (``clip > 0``, finite).
        bits: value bits; each quantised value lies in ``[0, 2**bits)`` (``2 <= bits <= 48``).
        modulus_bits: masked sums are taken modulo ``2**modulus_bits``; 32 or 64.
        max_sites: most sites whose inputs are summed in one round.
        max_weight: largest integer weight one site may apply (e.g. its sample count).
        noise_headroom: tail bound B (integer units, >= 0) of signed noise added to the sum,
            e.g. the distributed Skellam noise of ``dp.mode = "site-distributed"`` (Agarwal,
            Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
            Learning", NeurIPS 2021; :func:`fedbrats.masking.skellam_headroom`).  The noisy total
            lies in ``[-B, W*L + B]``; :func:`bits_needed` adds ``ceil(log2(2B + 1))`` bits for
            it.  0 = no noise (the default).
    """

    clip: float
    bits: int
    modulus_bits: int
    max_sites: int
    max_weight: int
    noise_headroom: int = 0

    @property
    def levels(self) -> int:
        """``L = 2**bits - 1``, the largest quantised value."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Quantisation step ``2 * clip / L``; also the per-coordinate error bound of a mean."""
        return 2.0 * float(self.clip) / self.levels

    @property
    def dtype(self) -> np.dtype:
        """``uint32`` or ``uint64``, the dtype of quantised values and masked sums."""
        return np.dtype(np.uint32) if self.modulus_bits == 32 else np.dtype(np.uint64)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _problems(params: QuantParams) -> list[str]:
    problems = []
    clip = params.clip
    if not isinstance(clip, numbers.Real) or isinstance(clip, bool) or not (math.isfinite(clip) and clip > 0):
        problems.append(f"clip must be a finite number > 0, got {clip!r}")
    if not _is_int(params.bits) or not 2 <= params.bits <= MAX_VALUE_BITS:
        problems.append(f"bits must be an integer in [2, {MAX_VALUE_BITS}], got {params.bits!r}")
    if not _is_int(params.modulus_bits) or params.modulus_bits not in (32, 64):
        problems.append(f"modulus_bits must be 32 or 64, got {params.modulus_bits!r}")
    if not _is_int(params.max_sites) or params.max_sites < 1:
        problems.append(f"max_sites must be an integer >= 1, got {params.max_sites!r}")
    if not _is_int(params.max_weight) or params.max_weight < 1:
        problems.append(f"max_weight must be an integer >= 1, got {params.max_weight!r}")
    if not _is_int(params.noise_headroom) or params.noise_headroom < 0:
        problems.append(f"noise_headroom must be an integer >= 0, got {params.noise_headroom!r}")
    return problems


def noise_bits(params: QuantParams) -> int:
    """``ceil(log2(2B + 1))`` for ``B = params.noise_headroom`` (0 when there is no noise)."""
    return (2 * int(params.noise_headroom)).bit_length()


def bits_needed(params: QuantParams) -> int:
    """``bits + ceil(log2(max_sites * max_weight)) + GUARD_BITS + ceil(log2(2B + 1))``.

    The last term is the signed noise headroom ``B = noise_headroom`` (0 bits without noise).
    Fields are assumed valid.
    """
    total_weight = int(params.max_sites) * int(params.max_weight)
    return int(params.bits) + (total_weight - 1).bit_length() + GUARD_BITS + noise_bits(params)


def check_budget(params: QuantParams, *, widen: bool = True) -> QuantParams:
    """Check that weighted sums of quantised values fit the modulus; widen 32 -> 64 or refuse.

    Args:
        params: the configured parameters.
        widen: if the sum does not fit modulo ``2**32``, return the same parameters with
            ``modulus_bits=64`` (when that fits) instead of refusing.

    Returns:
        ``params`` unchanged if they fit, or widened to a 64-bit modulus.

    Raises:
        ConfigError: a field is invalid (every problem is listed), or the budget does not fit,
            stating the bits needed and the bits available.
    """
    if not isinstance(params, QuantParams):
        raise CryptoInputError(f"params must be QuantParams, got {type(params).__name__}")
    problems = _problems(params)
    if problems:
        raise ConfigError(_SOURCE, problems)
    needed = bits_needed(params)
    if needed <= params.modulus_bits:
        return params
    if widen and needed <= 64:
        return replace(params, modulus_bits=64)
    total_weight = params.max_sites * params.max_weight
    m = params.modulus_bits
    noise = ""
    lower = "bits, max_sites or max_weight"
    if params.noise_headroom:
        noise = (f" + {noise_bits(params)} bits of noise headroom for DP noise within "
                 f"+-{params.noise_headroom}")
        lower = "bits, max_sites, max_weight or the noise (dp.site_noise_multiplier, dp.site_clip)"
    if widen:
        available = f"the largest modulus, 2^64, has 64 bits available; lower {lower}"
    elif needed <= 64:
        available = f"the modulus 2^{m} has {m} bits available (widening to 2^64 is not allowed)"
    else:
        available = f"the modulus 2^{m} has {m} bits available (even 2^64 would be too small)"
    raise ConfigError(
        _SOURCE,
        [
            f"bit budget exceeded: {params.bits} value bits + {(total_weight - 1).bit_length()} bits for "
            f"{params.max_sites} sites x weight {params.max_weight} (= {total_weight}) + {GUARD_BITS} guard bit"
            f"{noise} = {needed} bits needed, but {available}"
        ],
    )


def _generator(seed: int | bytes) -> np.random.Generator:
    if isinstance(seed, (bytes, bytearray)):
        if not seed:
            raise CryptoInputError("seed must not be empty")
        seed = int.from_bytes(seed, "big")
    elif not _is_int(seed) or seed < 0:
        raise CryptoInputError("seed must be bytes or a non-negative int")
    return np.random.Generator(np.random.PCG64(int(seed)))


def quantize(
    x: np.ndarray, params: QuantParams, *, seed: int | bytes, weight: int = 1, threads: int | None = None
) -> tuple[np.ndarray, int]:
    """Clip, scale and stochastically round an update to integers, times the site's weight.

    Args:
        x: the update, any shape, a floating dtype (float32 in fedbrats).
        params: parameters that pass :func:`check_budget` as they are (call it first and use
            its result; unchecked parameters that do not fit are refused here).
        seed: seed of the rounding generator ``Generator(PCG64(seed))``; bytes are read as a
            big-endian integer.  Use a fresh random seed per round.
        weight: the site's integer weight ``1 <= weight <= params.max_weight``.
        threads: worker threads (:func:`crypto.primitives.worker_threads`; ``None`` = the
            default).  Thread ``k`` quantises a contiguous range starting at value ``a_k`` with
            its own ``PCG64(seed)`` advanced by ``a_k`` draws (``PCG64.advance``), so it uses the
            very draws the single-threaded loop would: the result does not depend on it.

    Returns:
        ``(q, clipped)``: ``q = weight * round(v)`` with ``x``'s shape and dtype
        ``params.dtype``, and the number of values whose magnitude exceeded ``clip``.

    Raises:
        CryptoInputError: ``x`` is not floating-point or has non-finite values (the error gives
            their count; nothing is returned), ``weight`` is out of range, or ``seed`` or
            ``threads`` is invalid.
        ConfigError: the parameters are invalid or do not fit the modulus.
    """
    params = check_budget(params, widen=False)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise CryptoInputError(f"x must be a floating-point array, got dtype {x.dtype}")
    if not _is_int(weight) or not 1 <= weight <= params.max_weight:
        raise CryptoInputError(f"weight must be an integer in [1, {params.max_weight}], got {weight!r}")
    _generator(seed)  # refuse a bad seed before any work
    clip = float(params.clip)
    scale = params.levels / (2.0 * clip)
    flat = x.reshape(-1)
    out = np.empty(flat.size, dtype=params.dtype)
    w = params.dtype.type(weight)
    chunk = _CHUNK

    def work(first: int, last: int) -> int | None:
        """Quantise ``flat[first:last]`` into ``out``; the clipped count, or None if a value is
        not finite."""
        gen = _generator(seed)
        if first:
            gen.bit_generator.advance(first)  # as if ``first`` values had been rounded before
        size = min(last - first, chunk)
        v_buf = np.empty(size, dtype=np.float64)
        q_buf = np.empty(size, dtype=np.float64)
        u_buf = np.empty(size, dtype=np.float64)
        b_buf = np.empty(size, dtype=np.bool_)
        clipped = 0
        # Slices keep the float64 temporaries cache-resident; PCG64 draws are sequential, so the
        # result depends neither on the slice size nor on the ranges.  Every step is the float64
        # operation of the defining formula, in place in reused buffers:
        #   v = (clip(x, -clip, clip) + clip) * scale;  q = floor(v);  q += u < (v - q)
        for start in range(first, last, chunk):
            m = min(chunk, last - start)
            v, q, u, b = v_buf[:m], q_buf[:m], u_buf[:m], b_buf[:m]
            xs = flat[start : start + m]
            lo, hi = float(np.min(xs)), float(np.max(xs))  # NaN when a value is NaN
            np.copyto(v, xs, casting="unsafe")  # exact widening to float64
            if not (-clip <= lo and hi <= clip):  # some value is out of range or not finite
                if not np.isfinite(v).all():
                    return None
                # |x| > clip  <=>  x > clip or x < -clip (x finite, negation exact)
                clipped += int(np.count_nonzero(np.greater(v, clip, out=b)))
                clipped += int(np.count_nonzero(np.less(v, -clip, out=b)))
                np.clip(v, -clip, clip, out=v)
                hi = min(hi, clip)
            np.add(v, clip, out=v)
            np.multiply(v, scale, out=v)
            np.floor(v, out=q)  # >= 0: v >= (-clip + clip) * scale = 0
            np.subtract(v, q, out=v)  # v - floor(v), exact
            gen.random(out=u)  # the same draws as gen.random(size=m)
            np.less(u, v, out=b)
            o = out[start : start + m]
            np.copyto(o, q, casting="unsafe")  # exact: integers in [0, L]
            np.add(o, b.view(np.uint8), out=o)
            # Float round-off can put v a hair above L at the top end only.  IEEE add and
            # multiply are monotonic, so v <= (hi + clip) * scale: clamp only when that is > L - 1.
            if (hi + clip) * scale > params.levels - 1:
                np.minimum(o, params.levels, out=o)
            if weight != 1:
                np.multiply(o, w, out=o)  # fits: weight * L < 2**modulus_bits by the budget
        return clipped

    counts = _run_ranges(work, _split_range(flat.size, worker_threads(threads), 1))
    if any(c is None for c in counts):
        bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
        raise CryptoInputError(f"refusing to quantise: {bad} of {x.size} values are not finite (NaN or Inf)")
    return out.reshape(x.shape), sum(counts)


def dequantize_sum(total: np.ndarray, *, params: QuantParams, total_weight: int) -> np.ndarray:
    """Decode an unmasked sum ``sum_i w_i q_i`` into the weighted mean of the clipped updates.

    Inverts the affine map: ``mean = total * step / total_weight - clip``.  The result is within
    ``params.step`` of the weighted mean of the clipped inputs in every coordinate, and equal
    to it in expectation.

    Args:
        total: the unmasked sum, unsigned integers ``< 2**params.modulus_bits``.
        params: the parameters the sites quantised with (they must pass :func:`check_budget`).
        total_weight: ``W = sum_i w_i``, ``1 <= W <= max_sites * max_weight``.

    Returns:
        float64 array of ``total``'s shape.

    Raises:
        CryptoInputError: ``total_weight`` is out of range, ``total`` is not an unsigned integer
            array below the modulus, or some coordinates exceed ``W * (2**bits - 1)`` -- the masks
            did not cancel, a weight was misreported, or the sum is corrupt (the error counts the
            coordinates; nothing is decoded).
        ConfigError: the parameters are invalid or do not fit the modulus.
    """
    params = check_budget(params, widen=False)
    limit = params.max_sites * params.max_weight
    if not _is_int(total_weight) or not 1 <= total_weight <= limit:
        raise CryptoInputError(f"total_weight must be an integer in [1, {limit}], got {total_weight!r}")
    total = np.asarray(total)
    if total.dtype.kind != "u" or total.dtype.itemsize * 8 > 64:
        raise CryptoInputError(f"total must be an unsigned integer array, got dtype {total.dtype}")
    # Unsigned comparisons and the integer -> float64 conversion are exact whatever the input
    # width, so no widened uint64 copy is made.  One reduction finds the largest coordinate; the
    # range checks only count (a second pass) when it is out of range.
    top = int(total.max()) if total.size else 0
    if total.dtype.itemsize * 8 > params.modulus_bits and top >> params.modulus_bits:
        raise CryptoInputError(f"total has values >= 2^{params.modulus_bits}")
    bound = int(total_weight) * params.levels
    if top > bound:
        over = int(np.count_nonzero(total > np.uint64(bound)))
        raise CryptoInputError(
            f"{over} of {total.size} coordinates of the sum exceed total_weight x (2^{params.bits} - 1): "
            "the masks did not cancel, a weight was misreported, or the sum is corrupt"
        )
    # (float64(total) * (step / W)) - clip: the same float64 operations as widening first and
    # then scaling in place, without a separate conversion pass.
    mean = np.multiply(total, params.step / int(total_weight), dtype=np.float64)
    np.subtract(mean, float(params.clip), out=mean)
    return mean
