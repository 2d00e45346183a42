"""Threaded mask expansion and quantisation are bit-identical to the single-threaded path.

The work is split into contiguous ranges (ChaCha20 block boundaries for the masks, PCG64
``advance`` for the rounding draws); these tests pin that no split -- any size, any thread count,
ranges that start or end on slice and block boundaries -- changes a single output bit.  The
thread threshold is lowered so that small arrays really are split.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

import crypto.primitives as P
import crypto.quantize as Q
from crypto import secagg
from crypto.errors import CryptoInputError
from crypto.quantize import QuantParams, check_budget, dequantize_sum, quantize

# Sizes around the boundaries that matter: ChaCha20 blocks (16 uint32 / 8 uint64 words), the
# per-seed keystream slice (2^18 bytes) and the quantisation slice (2^16 values by default).
_EDGES = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 1000]
_SLICE32 = P._PRG_SLICE_BYTES // 4
_SIZES = st.one_of(
    st.sampled_from(_EDGES + [_SLICE32 - 1, _SLICE32, _SLICE32 + 1, 2 * _SLICE32 + 16]),
    st.integers(0, 5000),
)


def _small_ranges(mp: pytest.MonkeyPatch, min_words: int = 8) -> None:
    """Let arrays of a few dozen words be split across threads."""
    mp.setattr(P, "MIN_WORDS_PER_THREAD", min_words)


def _seed(tag: bytes) -> bytes:
    return hashlib.sha256(tag).digest()


# ---------------------------------------------------------------------------------------------
# Range splitting and the thread count


@given(count=st.integers(0, 10_000), parts=st.integers(1, 9), align=st.sampled_from([1, 8, 16]),
       min_words=st.sampled_from([1, 8, 100]))
@settings(max_examples=200, deadline=None)
def test_split_range_covers_everything_once_on_aligned_boundaries(count, parts, align, min_words):
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp, min_words)
        ranges = P._split_range(count, parts, align)
    assert len(ranges) <= parts
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(count))
    assert all(b > a for a, b in ranges)
    assert all(a % align == 0 for a, _ in ranges)


def test_worker_threads_explicit_env_default_and_refusals(monkeypatch):
    assert P.worker_threads(3) == 3  # an explicit request is honoured as given
    monkeypatch.delenv(P.THREADS_ENV, raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert P.worker_threads() == min(P.DEFAULT_THREADS, cpus)
    monkeypatch.setenv(P.THREADS_ENV, "1")
    assert P.worker_threads() == 1
    monkeypatch.setenv(P.THREADS_ENV, "64")
    assert P.worker_threads() == min(64, cpus)
    for bad in ["0", "-2", "two", "1.5"]:
        monkeypatch.setenv(P.THREADS_ENV, bad)
        with pytest.raises(CryptoInputError):
            P.worker_threads()
    for bad in [0, -1, 1.0, True, "2"]:
        with pytest.raises(CryptoInputError):
            P.worker_threads(bad)


def test_chacha20_at_block_is_the_keystream_from_that_block():
    seed = _seed(b"offset")
    whole = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(64 * 40))
    for block in (0, 1, 2, 17, 39):
        tail = P._chacha20_at(seed, block).update(bytes(64 * (40 - block)))
        assert tail == whole[64 * block :]


# ---------------------------------------------------------------------------------------------
# Mask expansion


@given(count=_SIZES, bits=st.sampled_from([32, 64]), threads=st.integers(2, 5))
@settings(max_examples=60, deadline=None)
def test_prg_uint_threaded_is_bit_identical(count, bits, threads):
    seed = _seed(b"prg" + count.to_bytes(8, "big"))
    serial = P.prg_uint(seed, count, bits=bits, threads=1)
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp)
        threaded = P.prg_uint(seed, count, bits=bits, threads=threads)
    assert threaded.dtype == serial.dtype and threaded.tobytes() == serial.tobytes()
    raw = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(serial.nbytes))
    assert serial.tobytes() == raw


@given(count=_SIZES, bits=st.sampled_from([32, 64]), threads=st.integers(2, 5),
       signs=st.lists(st.booleans(), min_size=1, max_size=4), with_src=st.booleans())
@settings(max_examples=60, deadline=None)
def test_prg_accumulate_threaded_is_bit_identical(count, bits, threads, signs, with_src):
    terms = [(_seed(bytes([i]) + count.to_bytes(8, "big")), sub) for i, sub in enumerate(signs)]
    dtype = np.dtype(f"u{bits // 8}")
    start = np.random.default_rng(count).integers(0, 2**bits - 1, size=count, dtype=np.uint64, endpoint=True)
    start = start.astype(dtype)
    expected = start.copy()
    for seed, sub in terms:  # the definition: materialised masks, one at a time
        mask = P.prg_uint(seed, count, bits=bits, threads=1)
        expected = expected - mask if sub else expected + mask
    serial = start.copy()
    P._prg_accumulate(serial, terms, bits=bits, threads=1)
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp)
        if with_src:
            threaded = np.full(count, 12345, dtype=dtype)
            src = start.copy()
            P._prg_accumulate(threaded, terms, bits=bits, threads=threads, src=src)
            assert np.array_equal(src, start)  # read, never written
        else:
            threaded = start.copy()
            P._prg_accumulate(threaded, terms, bits=bits, threads=threads)
    assert np.array_equal(serial, expected) and np.array_equal(threaded, expected)


def test_prg_accumulate_refuses_a_mismatched_src():
    out = np.zeros(10, np.uint32)
    for src in [np.zeros(9, np.uint32), np.zeros(10, np.uint64), np.zeros(10, np.int32), np.zeros((2, 5), np.uint32)]:
        with pytest.raises(CryptoInputError):
            P._prg_accumulate(out, [(bytes(32), False)], bits=32, src=src)


def test_prg_accumulate_with_no_terms_copies_src():
    out = np.zeros(5, np.uint64)
    P._prg_accumulate(out, [], bits=64, src=np.arange(5, dtype=np.uint32))
    assert out.tolist() == [0, 1, 2, 3, 4]


@given(count=_SIZES, bits=st.sampled_from([32, 64]), threads=st.integers(2, 4), n_peers=st.integers(0, 3),
       narrow=st.booleans())
@settings(max_examples=40, deadline=None)
def test_mask_and_unmask_threaded_are_bit_identical_and_leave_inputs_alone(count, bits, threads, n_peers, narrow):
    rng = np.random.default_rng(count + n_peers)
    qdtype = np.uint32 if (narrow or bits == 32) else np.uint64
    q = rng.integers(0, 2**31, size=count, dtype=np.uint64).astype(qdtype)
    q_before = q.copy()
    keys = {f"site-{i}": _seed(b"peer" + bytes([i])) for i in range(1, n_peers + 1)}
    common = dict(self_seed=_seed(b"self"), pairwise_keys=keys, own_id="site-0", round=3, federation="f", bits=bits)
    serial = secagg.mask_update(q, threads=1, **common)
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp)
        threaded = secagg.mask_update(q, threads=threads, **common)
        drop = {("site-0", v): s for v, s in keys.items()}
        un_threaded = secagg.unmask_sum(serial, survivors_self_seeds={"site-0": common["self_seed"]},
                                        dropped_pairwise=drop, round=3, federation="f", bits=bits, threads=threads)
    assert np.array_equal(q, q_before)
    assert serial.dtype == threaded.dtype == np.dtype(f"u{bits // 8}") and np.array_equal(serial, threaded)
    un_serial = secagg.unmask_sum(serial, survivors_self_seeds={"site-0": common["self_seed"]},
                                  dropped_pairwise=drop, round=3, federation="f", bits=bits, threads=1)
    # Unmasking this site's own masks (its neighbours "dropped") gives back q exactly.
    assert np.array_equal(un_serial, q.astype(un_serial.dtype)) and np.array_equal(un_threaded, un_serial)


def test_mask_update_keeps_a_non_contiguous_input_shape():
    q = np.arange(24, dtype=np.uint32).reshape(4, 6)[:, ::2]
    y = secagg.mask_update(q, self_seed=_seed(b"s"), pairwise_keys={}, own_id="a", round=0, federation="f", bits=32)
    expected = (q.reshape(-1) + P.prg_uint(_seed(b"s"), q.size, bits=32)).reshape(q.shape)
    assert y.shape == (4, 3) and np.array_equal(y, expected)


# ---------------------------------------------------------------------------------------------
# Quantisation


def _reference_quantize(x: np.ndarray, params: QuantParams, *, seed: int | bytes, weight: int) -> tuple[np.ndarray, int]:
    """The defining formula, whole-array and single-threaded (float64 throughout)."""
    gen = Q._generator(seed)
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    clip = float(params.clip)
    clipped = int(np.count_nonzero(v > clip) + np.count_nonzero(v < -clip))
    v = (np.clip(v, -clip, clip) + clip) * (params.levels / (2.0 * clip))
    q = np.floor(v)
    q = q + (gen.random(size=v.size) < (v - q))
    q = np.clip(q, 0, params.levels).astype(params.dtype) * params.dtype.type(weight)
    return q.reshape(np.shape(x)), clipped


_PARAMS = [
    check_budget(QuantParams(clip=0.25, bits=20, modulus_bits=32, max_sites=10, max_weight=100)),
    check_budget(QuantParams(clip=0.1, bits=2, modulus_bits=32, max_sites=3, max_weight=7)),
    check_budget(QuantParams(clip=1.0, bits=24, modulus_bits=32, max_sites=16, max_weight=400)),  # -> 2^64
    check_budget(QuantParams(clip=3.0, bits=48, modulus_bits=64, max_sites=2, max_weight=4)),
]


@given(
    size=st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 96, 97, 98, 1000]), st.integers(0, 3000)),
    params=st.sampled_from(_PARAMS),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    spread=st.sampled_from([0.01, 0.5, 4.0]),
    threads=st.integers(1, 5),
    chunk=st.sampled_from([1, 7, 64, 97, 1 << 16]),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_quantize_threaded_matches_the_defining_formula_bit_for_bit(size, params, dtype, spread, threads, chunk, data):
    weight = data.draw(st.integers(1, params.max_weight))
    seed = data.draw(st.one_of(st.integers(0, 2**70), st.binary(min_size=1, max_size=16)))
    rng = np.random.default_rng(size)
    x = (rng.normal(0, spread * params.clip, size=size)).astype(dtype)
    if size >= 4:  # exact ends of the range and their neighbours
        c = dtype(params.clip)
        x[:4] = [c, -c, np.nextafter(c, dtype(np.inf)), np.nextafter(-c, dtype(0))]
    expected, expected_clipped = _reference_quantize(x, params, seed=seed, weight=weight)
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp, 1)
        mp.setattr(Q, "_CHUNK", chunk)
        got, clipped = quantize(x, params, seed=seed, weight=weight, threads=threads)
    assert got.dtype == params.dtype and got.shape == x.shape
    assert np.array_equal(got, expected) and clipped == expected_clipped


def test_quantize_clamps_the_top_end_exactly_like_the_formula():
    # Values at +clip land on v = L, or a hair above it through round-off; never above L.
    for params in _PARAMS:
        x = np.full(5000, params.clip, dtype=np.float64)
        x[::2] = np.nextafter(params.clip, 0)
        got, _ = quantize(x, params, seed=5, weight=1, threads=2)
        assert int(got.max()) <= params.levels
        assert np.array_equal(got, _reference_quantize(x, params, seed=5, weight=1)[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_quantize_non_finite_anywhere_is_refused_with_the_full_count(threads):
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp, 1)
        mp.setattr(Q, "_CHUNK", 100)
        x = np.zeros(1000, dtype=np.float32)
        x[[0, 998]] = np.nan
        x[500] = -np.inf
        with pytest.raises(CryptoInputError, match="3 of 1000 values are not finite"):
            quantize(x, _PARAMS[0], seed=1, threads=threads)


@given(size=st.integers(0, 500), params=st.sampled_from(_PARAMS), data=st.data())
@settings(max_examples=60, deadline=None)
def test_dequantize_sum_is_the_float64_affine_map(size, params, data):
    w = data.draw(st.integers(1, params.max_sites * params.max_weight))
    hi = w * params.levels
    total = np.random.default_rng(size).integers(0, hi, size=size, dtype=np.uint64, endpoint=True)
    total = total.astype(params.dtype)
    ref = total.astype(np.float64)
    ref *= params.step / w
    ref -= float(params.clip)
    got = dequantize_sum(total, params=params, total_weight=w)
    assert got.dtype == np.float64 and np.array_equal(got, ref)
    if size:
        bad = total.copy()
        bad[size // 2] = hi + 1
        with pytest.raises(CryptoInputError, match=f"1 of {size} coordinates"):
            dequantize_sum(bad, params=params, total_weight=w)


@given(size=st.integers(0, 2000), threads=st.integers(1, 3), weight=st.integers(1, 100))
@settings(max_examples=40, deadline=None)
def test_one_extra_trailing_value_leaves_the_update_quantisation_unchanged(size, threads, weight):
    # node.secagg_client.MaskingClient.mask quantises [update, 0.0] and overwrites the last
    # value with the weight: the update's draws come first, so its q is exactly the same.
    x = np.random.default_rng(size).normal(0, 0.2, size=size).astype(np.float32)
    padded = np.append(x, np.float32(0.0))
    with pytest.MonkeyPatch.context() as mp:
        _small_ranges(mp, 1)
        mp.setattr(Q, "_CHUNK", 97)
        q, clipped = quantize(x, _PARAMS[0], seed=b"pad", weight=weight, threads=threads)
        qp, clipped_p = quantize(padded, _PARAMS[0], seed=b"pad", weight=weight, threads=threads)
    assert np.array_equal(qp[:size], q) and clipped_p == clipped
