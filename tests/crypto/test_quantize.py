"""Quantisation, its error bound and unbiasedness, and the bit-budget check (cases K08, K10)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crypto.errors import CryptoInputError
from crypto.quantize import GUARD_BITS, QuantParams, bits_needed, check_budget, dequantize_sum, quantize
from fedbrats.errors import ConfigError

K08 = QuantParams(clip=1.0, bits=24, modulus_bits=32, max_sites=16, max_weight=400)


# ---------------------------------------------------------------------------------------------
# Bit budget


def test_k08_budget_widens_to_64_bits():
    # 24 value bits + ceil(log2(16 * 400 = 6400)) = 13 + 1 guard bit = 38 > 32.
    assert bits_needed(K08) == 24 + 13 + GUARD_BITS == 38
    widened = check_budget(K08)
    assert widened.modulus_bits == 64 and widened.dtype == np.uint64
    assert (widened.clip, widened.bits, widened.max_sites, widened.max_weight) == (1.0, 24, 16, 400)


def test_k08_budget_refused_without_widening_states_needed_and_available():
    with pytest.raises(ConfigError) as err:
        check_budget(K08, widen=False)
    text = str(err.value)
    assert "38 bits needed" in text and "2^32 has 32 bits available (widening to 2^64 is not allowed)" in text
    assert "16 sites" in text and "weight 400" in text


def test_budget_refused_when_even_64_bits_is_too_small():
    params = QuantParams(clip=1.0, bits=48, modulus_bits=32, max_sites=1 << 10, max_weight=1 << 10)
    with pytest.raises(ConfigError, match="69 bits needed, but the largest modulus, 2\\^64, has 64 bits available"):
        check_budget(params)


def test_noise_headroom_adds_bits_and_widens_or_refuses_naming_the_noise():
    from dataclasses import replace

    # 16 value bits + ceil(log2(8 * 100)) = 10 + 1 guard bit = 27: fits 2^32 without noise.
    base = QuantParams(clip=1.0, bits=16, modulus_bits=32, max_sites=8, max_weight=100)
    assert base.noise_headroom == 0 and bits_needed(base) == 27
    assert check_budget(base, widen=False) is base
    # Noise within +-15 needs ceil(log2(31)) = 5 more bits: 32, still fits; +-16: 33, does not.
    assert check_budget(replace(base, noise_headroom=15), widen=False).modulus_bits == 32
    noisy = replace(base, noise_headroom=100)  # ceil(log2(201)) = 8 bits -> 35
    assert bits_needed(noisy) == 35 and bits_needed(replace(base, noise_headroom=16)) == 33
    widened = check_budget(noisy)
    assert widened.modulus_bits == 64 and widened.noise_headroom == 100
    with pytest.raises(ConfigError) as err:
        check_budget(noisy, widen=False)
    text = str(err.value)
    assert "+ 8 bits of noise headroom for DP noise within +-100 = 35 bits needed" in text
    assert "2^32 has 32 bits available" in text
    # 40 + 10 + 1 = 51 fits 2^64, but not with noise within +-2^13 (15 more bits: 66).
    big = QuantParams(clip=1.0, bits=40, modulus_bits=32, max_sites=8, max_weight=100, noise_headroom=1 << 13)
    with pytest.raises(ConfigError, match="66 bits needed, but the largest modulus, 2\\^64, has 64 bits "
                                          "available; lower .*or the noise \\(dp.site_noise_multiplier"):
        check_budget(big)
    with pytest.raises(ConfigError, match="noise_headroom must be an integer >= 0, got -1"):
        check_budget(replace(base, noise_headroom=-1))


@pytest.mark.parametrize(
    "bits,sites,weight,modulus,ok",
    [
        (16, 16, 400, 32, True),  # 16 + 13 + 1 = 30 <= 32
        (18, 16, 400, 32, True),  # 18 + 13 + 1 = 32 -> fits exactly
        (19, 16, 400, 32, False),  # 33 -> does not
        (24, 1, 1, 32, True),  # ceil(log2 1) = 0
        (31, 1, 1, 32, True),
        (32, 1, 1, 32, False),
        (20, 2, 1024, 32, True),  # 2048 = 2^11 exactly -> 11 bits
        (20, 2, 1025, 32, False),
    ],
)
def test_budget_boundaries(bits, sites, weight, modulus, ok):
    params = QuantParams(clip=0.5, bits=bits, modulus_bits=modulus, max_sites=sites, max_weight=weight)
    if ok:
        assert check_budget(params, widen=False) is params
    else:
        with pytest.raises(ConfigError):
            check_budget(params, widen=False)
        assert check_budget(params).modulus_bits == 64


@given(bits=st.integers(2, 48), sites=st.integers(1, 5000), weight=st.integers(1, 5000))
@settings(max_examples=200, deadline=None)
def test_budget_guarantees_no_wrap(bits, sites, weight):
    params = QuantParams(clip=1.0, bits=bits, modulus_bits=32, max_sites=sites, max_weight=weight)
    try:
        checked = check_budget(params)
    except ConfigError:
        assert sites * weight * ((1 << bits) - 1) > 1 << 62  # refused only near the 64-bit limit
        return
    largest = sites * weight * ((1 << bits) - 1)
    assert largest < 1 << (checked.modulus_bits - GUARD_BITS)  # fits with the guard bit spare
    if checked.modulus_bits == 64:
        assert largest > 1 << 30  # widened only near the 32-bit limit


def test_invalid_params_report_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        check_budget(QuantParams(clip=float("nan"), bits=1, modulus_bits=48, max_sites=0, max_weight=-3))
    assert len(err.value.problems) == 5


# ---------------------------------------------------------------------------------------------
# quantize / dequantize_sum


P16 = check_budget(QuantParams(clip=1.0, bits=16, modulus_bits=32, max_sites=8, max_weight=100))

finite_floats = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32)


@given(
    x=hnp.arrays(np.float32, st.integers(1, 200), elements=finite_floats),
    clip=st.sampled_from([0.01, 0.5, 1.0, 3.0]),
    bits=st.integers(2, 30),
    seed=st.integers(0, 2**64),
)
@settings(max_examples=100, deadline=None)
def test_encode_decode_within_one_step(x, clip, bits, seed):
    params = check_budget(QuantParams(clip=clip, bits=bits, modulus_bits=32, max_sites=2, max_weight=1))
    q, clipped = quantize(x, params, seed=seed)
    assert q.dtype == params.dtype and q.shape == x.shape
    assert int(q.max()) <= (1 << bits) - 1
    assert clipped == int(np.sum(np.abs(x.astype(np.float64)) > clip))
    back = dequantize_sum(q, params=params, total_weight=1)
    ref = np.clip(x.astype(np.float64), -clip, clip)
    assert np.all(np.abs(back - ref) <= params.step * (1 + 1e-9))


def test_grid_points_round_trip_exactly():
    params = check_budget(QuantParams(clip=2.0, bits=12, modulus_bits=32, max_sites=1, max_weight=1))
    q = np.arange(0, 1 << 12, dtype=np.uint32)
    x = dequantize_sum(q, params=params, total_weight=1)
    again, clipped = quantize(x, params, seed=7)
    assert clipped == 0 and np.array_equal(again, q)
    assert x[0] == -2.0 and x[-1] == 2.0


@given(
    xs=st.lists(hnp.arrays(np.float32, 64, elements=finite_floats), min_size=1, max_size=8),
    weights=st.lists(st.integers(1, 100), min_size=8, max_size=8),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_weighted_mean_within_one_step_of_plaintext_fedavg(xs, weights, seed):
    weights = weights[: len(xs)]
    total = np.zeros(64, dtype=P16.dtype)
    for n, (x, w) in enumerate(zip(xs, weights)):
        q, _ = quantize(x, P16, seed=seed + n, weight=w)
        total += q
    mean = dequantize_sum(total, params=P16, total_weight=sum(weights))
    ref = sum(w * np.clip(x.astype(np.float64), -1, 1) for x, w in zip(xs, weights)) / sum(weights)
    assert np.all(np.abs(mean - ref) <= P16.step * (1 + 1e-9))


def test_stochastic_rounding_is_unbiased():
    # A value a third of the way between two grid points: deterministic rounding would be off by
    # step/3 every time; the average of stochastic roundings converges to the value.
    params = check_budget(QuantParams(clip=1.0, bits=8, modulus_bits=32, max_sites=1, max_weight=1))
    value = -1.0 + (100 + 1 / 3) * params.step
    x = np.full(200_000, value, dtype=np.float64)
    q, _ = quantize(x, params, seed=2024)
    assert set(np.unique(q).tolist()) == {100, 101}
    decoded = dequantize_sum(q, params=params, total_weight=1)
    # std of the mean = step * sqrt(p (1 - p) / n) ~ step * 0.00105; allow 5 sigma.
    assert abs(decoded.mean() - value) < 5 * params.step * np.sqrt((1 / 3) * (2 / 3) / x.size)
    assert abs(decoded.mean() - value) < params.step / 100


def test_quantize_result_does_not_depend_on_the_slice_size(monkeypatch):
    import crypto.quantize as Q

    x = np.random.default_rng(3).normal(size=(7, 1001)).astype(np.float32)
    whole, clipped = quantize(x, P16, seed=99)
    monkeypatch.setattr(Q, "_CHUNK", 97)
    sliced, clipped2 = quantize(x, P16, seed=99)
    assert np.array_equal(whole, sliced) and clipped == clipped2 and whole.shape == (7, 1001)


def test_quantize_is_deterministic_under_a_seed_and_never_uses_global_state():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    a, _ = quantize(x, P16, seed=b"\x01" * 16)
    np.random.seed(0)
    b, _ = quantize(x, P16, seed=b"\x01" * 16)
    np.random.seed(1)
    c, _ = quantize(x, P16, seed=b"\x02" * 16)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_k08_clipped_values_counted_and_fedavg_within_tolerance():
    rng = np.random.default_rng(8)
    params = check_budget(K08)
    assert params.modulus_bits == 64
    n_sites, dim = 16, 5000
    weights = rng.integers(1, 401, size=n_sites).tolist()
    weights[0] = 400
    updates = [rng.uniform(-0.9, 0.9, size=dim).astype(np.float32) for _ in range(n_sites)]
    updates[3][:100] = np.linspace(1.5, 3.0, 100, dtype=np.float32)  # one site with values up to 3.0
    total = np.zeros(dim, dtype=np.uint64)
    counts = []
    for n, (x, w) in enumerate(zip(updates, weights)):
        q, clipped = quantize(x, params, seed=n, weight=w)
        counts.append(clipped)
        total += q
    assert counts[3] == 100 and sum(counts) == 100
    mean = dequantize_sum(total, params=params, total_weight=sum(weights))
    ref = sum(w * np.clip(x.astype(np.float64), -1, 1) for x, w in zip(updates, weights)) / sum(weights)
    step = params.step  # 2 / (2^24 - 1)
    assert np.max(np.abs(mean - ref)) <= step
    assert np.max(np.abs(mean - ref)) <= n_sites * step  # the case's looser tolerance n * step


def test_k08_unchecked_32_bit_params_are_refused_by_quantize():
    with pytest.raises(ConfigError, match="38 bits needed"):
        quantize(np.zeros(4, np.float32), K08, seed=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_k10_non_finite_values_are_refused_with_their_count(bad):
    x = np.zeros(1000, dtype=np.float32)
    x[[3, 500]] = bad
    x[7] = np.nan
    with pytest.raises(CryptoInputError, match="3 of 1000 values are not finite"):
        quantize(x, P16, seed=0)


@pytest.mark.parametrize(
    "x,kwargs",
    [
        (np.zeros(3, np.int32), dict(seed=0)),  # not floating point
        (np.zeros(3, np.float32), dict(seed=0, weight=0)),
        (np.zeros(3, np.float32), dict(seed=0, weight=101)),  # above max_weight
        (np.zeros(3, np.float32), dict(seed=-1)),
        (np.zeros(3, np.float32), dict(seed=b"")),
        (np.zeros(3, np.float32), dict(seed=1.5)),
    ],
)
def test_quantize_refuses_bad_arguments(x, kwargs):
    with pytest.raises(CryptoInputError):
        quantize(x, P16, **kwargs)


def test_dequantize_detects_sums_that_did_not_unmask():
    x = np.zeros(1000, dtype=np.float32)
    q, _ = quantize(x, P16, seed=0, weight=10)
    garbage = q + np.random.default_rng(0).integers(0, 2**32, size=q.size, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(CryptoInputError, match=r"of 1000 coordinates of the sum exceed"):
        dequantize_sum(garbage, params=P16, total_weight=10)
    with pytest.raises(CryptoInputError, match="exceed"):  # weight misreported (lower than used)
        dequantize_sum(q + np.uint32(P16.levels * 5), params=P16, total_weight=5)


@pytest.mark.parametrize(
    "total,weight",
    [
        (np.zeros(3, np.int64), 1),  # signed
        (np.zeros(3, np.float64), 1),
        (np.zeros(3, np.uint32), 0),
        (np.zeros(3, np.uint32), 801),  # above max_sites * max_weight
        (np.full(3, 2**40, np.uint64), 1),  # above a 32-bit modulus
    ],
)
def test_dequantize_refuses_bad_arguments(total, weight):
    with pytest.raises(CryptoInputError):
        dequantize_sum(total, params=P16, total_weight=weight)
