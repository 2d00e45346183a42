"""CKKS homomorphic aggregation: packing, parameter checks, contexts, sums (cases K05, K06)."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import ckks
from crypto.ckks import (
    CHUNK_HEADER_BYTES,
    DEFAULT_PARAMS,
    CKKSParams,
    EncryptedSum,
    check_params,
    chunk_count,
    decrypt_aggregate,
    decryption_error_bound,
    encrypt_update,
    load_context,
    make_context,
    noise_flood,
    payload_size,
    round_for_release,
    value_limit,
)
from crypto.errors import CryptoError, CryptoInputError
from fedbrats.errors import ConfigError, FedbratsError

K05_PARAMS = 4_700_000


@pytest.fixture(scope="module")
def fed():
    return make_context(DEFAULT_PARAMS)


@pytest.fixture(scope="module")
def sec(fed):
    return load_context(fed.secret, expect_secret=True)


@pytest.fixture(scope="module")
def pub(fed):
    return load_context(fed.public, expect_secret=False)


@pytest.fixture(scope="module")
def other_sec():
    """A second federation with the same parameters (so only the fingerprint tells them apart)."""
    return load_context(make_context(DEFAULT_PARAMS).secret, expect_secret=True)


def _public_header_len(params: CKKSParams) -> int:
    return 8 + 6 + len(params.coeff_mod_bit_sizes) + 32


def _problems(err: pytest.ExceptionInfo) -> list[str]:
    assert isinstance(err.value, ConfigError)
    return err.value.problems


# ---------------------------------------------------------------------------------------------
# Parameter checks (K06)


def test_default_params_fit_the_k06_workload():
    # 10 sites, |delta| <= 0.1, weights up to 100: 18 bits of headroom above 2^40 for the sum.
    check_params(DEFAULT_PARAMS, max_sites=10, max_abs_value=0.1, max_weight=100)
    assert DEFAULT_PARAMS.slots == 4096
    assert value_limit(DEFAULT_PARAMS) == 2.0**18
    # The bound the precision check uses, at 10 sites: 8 sigma of the summed fresh errors.
    bound = decryption_error_bound(DEFAULT_PARAMS, 10)
    assert bound == pytest.approx(8 * math.sqrt(10 * 4096 * (10.5 + 1 / 12)) / 2.0**40)
    assert 4e-9 < bound < 6e-9


def test_k06b_refused_stating_required_and_available_headroom():
    params = CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(30, 21, 30), scale_bits=21)
    with pytest.raises(ConfigError) as err:
        check_params(params, max_sites=32, max_abs_value=8.0, max_weight=400)
    problems = _problems(err)
    assert len(problems) == 2
    headroom, precision = problems
    # 32 x 8 x 400 = 102400 < 2^17: 17 integer bits + sign + guard above 2^21 = 40 bits > 30.
    assert headroom.startswith("headroom:")
    assert "32 sites" in headroom and "|102400|" in headroom and "= 40 bits" in headroom
    assert "the first prime has 30 bits" in headroom
    assert "9 bits of headroom available above the scale, 19 required" in headroom
    # 8 * sqrt(32 * 4096 * 10.58) = 2^13.2 units, times (1 + 8) / 1e-5: scale >= 2^33 needed.
    assert precision.startswith("precision:") and "requires scale_bits >= 33, available 21" in precision


def test_k06a_fedbrats_never_multiplies_so_60_40_60_fits(sec):
    """Sum w_i Enc(x_i) then x 1/sum w needs two rescales; [60, 40, 60] has one.  fedbrats adds only."""
    params = CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=40)
    check_params(params, max_sites=10, max_abs_value=0.1, max_weight=100)  # depth 0: it fits

    # The multiplying pipeline, on raw TenSEAL: the second product cannot be rescaled.
    raw = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    raw.global_scale = 2.0**40
    rng = np.random.default_rng(6)
    xs, ws = [rng.uniform(-0.1, 0.1, 16) for _ in range(3)], [30.0, 50.0, 20.0]
    acc = None
    for x, w in zip(xs, ws):
        term = ts.ckks_vector(raw, x) * w  # plaintext weight: the aggregator would know it
        acc = term if acc is None else acc + term
    with pytest.raises(ValueError, match="scale out of bounds"):
        acc * (1.0 / sum(ws))

    # fedbrats' pipeline on the same chain: encrypt w*x and w, add, decrypt, divide at the site.
    fed = make_context(params)
    s_ctx, p_ctx = load_context(fed.secret, expect_secret=True), load_context(fed.public, expect_secret=False)
    total = EncryptedSum(p_ctx, num_params=16)
    for x, w in zip(xs, ws):
        total.add(encrypt_update(w * x, w, s_ctx, workers=1))
    s, w_total = decrypt_aggregate(total.serialize(), s_ctx, 16)
    expected = sum(w * x for x, w in zip(xs, ws)) / sum(ws)
    assert w_total == pytest.approx(100.0, abs=1e-6)
    assert np.abs(s / w_total - expected).max() < 1e-8


def test_bad_parameter_set_lists_every_problem():
    params = CKKSParams(poly_modulus_degree=1000, coeff_mod_bit_sizes=(70,), scale_bits=0)
    with pytest.raises(ConfigError) as err:
        check_params(params, max_sites=0, max_abs_value=float("nan"), max_weight=0, tolerance=-1.0)
    problems = _problems(err)
    text = "\n".join(problems)
    assert "poly_modulus_degree must be one of 4096, 8192, 16384, 32768, got 1000" in text
    assert "needs at least 2 primes" in text
    assert "every prime needs 20 to 60 bits, got [70]" in text
    assert "scale_bits must be an integer in [1, 60], got 0" in text
    assert "max_sites must be an integer >= 1, got 0" in text
    assert "max_abs_value must be a finite number > 0, got nan" in text
    assert "max_weight must be an integer >= 1, got 0" in text
    assert "tolerance must be a finite number > 0" in text
    assert len(problems) == 8
    assert str(err.value).startswith("CKKS parameters: 8 configuration problem(s):")


def test_security_bound_and_scale_above_first_prime_refused():
    with pytest.raises(ConfigError) as err:
        check_params(CKKSParams(4096, (60, 60), 40), max_sites=2, max_abs_value=1.0, max_weight=1)
    assert _problems(err) == [
        "coeff_mod_bit_sizes: 120 bits in total, but 128-bit security at N=4096 allows at most 109 bits"
    ]
    with pytest.raises(ConfigError, match=r"scale_bits \(45\) must be smaller than the first prime \(40 bits\)"):
        check_params(CKKSParams(8192, (40, 40), 45), max_sites=2, max_abs_value=1.0, max_weight=1)
    with pytest.raises(ConfigError, match="expected CKKSParams"):
        check_params((8192, (60, 40), 40), max_sites=2, max_abs_value=1.0, max_weight=1)


@pytest.mark.parametrize(
    "first,sites,weight,ok",
    [
        (60, 64, 4096, True),  # B = 2^18: 40 + 18 + 1 sign + 1 guard = 60 bits, exactly the first prime
        (60, 64, 4097, False),  # one more: 61 bits
        (59, 64, 4096, False),
        (59, 64, 2048, True),
    ],
)
def test_headroom_boundary(first, sites, weight, ok):
    params = CKKSParams(8192, (first, 40), 40)
    if ok:
        check_params(params, max_sites=sites, max_abs_value=1.0, max_weight=weight, tolerance=1e-3)
    else:
        with pytest.raises(ConfigError, match="headroom:"):
            check_params(params, max_sites=sites, max_abs_value=1.0, max_weight=weight, tolerance=1e-3)


def test_precision_boundary():
    # 10 sites, |mean| <= 0.1: the bound is 8 sqrt(10 * 4096 * 10.58) * 1.1 / 2^scale.
    units = 8 * math.sqrt(10 * 4096 * (10.5 + 1 / 12)) * 1.1
    check_params(DEFAULT_PARAMS, max_sites=10, max_abs_value=0.1, max_weight=100, tolerance=units / 2.0**40 * 1.01)
    with pytest.raises(ConfigError, match="requires scale_bits >= 41, available 40"):
        check_params(DEFAULT_PARAMS, max_sites=10, max_abs_value=0.1, max_weight=100, tolerance=units / 2.0**40 * 0.99)
    with pytest.raises(ConfigError, match="total weight >= 0.5"):
        check_params(DEFAULT_PARAMS, max_sites=10, max_abs_value=0.1, max_weight=100, min_total_weight=0.5,
                     tolerance=units / 2.0**40 * 1.01)


@settings(max_examples=200, deadline=None)
@given(
    n=st.sampled_from([2048, 4096, 8192, 16384, 32768]),
    bits=st.lists(st.integers(10, 70), min_size=1, max_size=5),
    scale=st.integers(0, 70),
    sites=st.integers(1, 1000),
    value=st.floats(1e-3, 1e3),
    weight=st.integers(1, 10_000),
)
def test_check_params_accepts_only_what_fits(n, bits, scale, sites, value, weight):
    params = CKKSParams(n, tuple(bits), scale)
    try:
        check_params(params, max_sites=sites, max_abs_value=value, max_weight=weight)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) for p in err.problems)
        return
    # Accepted: structure, security, headroom and precision all hold.
    assert n in ckks.ALLOWED_DEGREES and len(bits) >= 2 and sum(bits) <= ckks.MAX_COEFF_BITS[n]
    assert all(20 <= b <= 60 for b in bits) and 1 <= scale < bits[0]
    assert sites * weight * max(value, 1.0) * 2.0 ** (scale + 2) <= 2.0 ** bits[0]
    assert decryption_error_bound(params, sites) * (1 + value) <= 1e-5 * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------
# Contexts


def test_contexts_fingerprints_and_keys(fed, sec, pub):
    assert fed.fingerprint == hashlib.sha256(fed.public).hexdigest() == sec.fingerprint == pub.fingerprint
    assert sec.is_secret and not pub.is_secret
    assert sec.params == pub.params == DEFAULT_PARAMS
    # K05: the aggregator's context has no secret key and no Galois or relinearisation keys.
    assert not pub._ts.has_secret_key() and not pub._ts.is_private()
    assert not pub._ts.has_galois_keys() and not pub._ts.has_relin_keys()
    assert len(fed.public) < 200  # parameters and a context id: nothing else
    assert sec._ts.has_secret_key()
    # No key material in reprs.
    assert "secret=" not in repr(fed) and fed.fingerprint in repr(fed)
    assert "fingerprint=" in repr(sec) and len(repr(sec)) < 200
    # Same parameters, another federation: another fingerprint.
    assert make_context(DEFAULT_PARAMS).fingerprint != fed.fingerprint


def test_load_context_refuses_the_wrong_kind(fed):
    with pytest.raises(FedbratsError, match="holds no secret key; a site needs the secret context"):
        load_context(fed.public, expect_secret=True)
    with pytest.raises(FedbratsError, match="refusing a secret CKKS context where a public one is expected"):
        load_context(fed.secret, expect_secret=False)
    for bad in (b"", b"garbage", fed.public[:30], fed.public[:-5] + b"xxxxx", fed.secret[:100]):
        with pytest.raises(FedbratsError):
            load_context(bad, expect_secret=bad.startswith(b"FBCKKSS1"))
    with pytest.raises(FedbratsError):
        load_context("text", expect_secret=False)


def test_load_context_refuses_a_public_file_holding_keys(sec):
    head = _public_header_len(DEFAULT_PARAMS)
    public = sec._ts.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    fed_public = make_context(DEFAULT_PARAMS).public
    assert fed_public.endswith(public)
    with_secret = fed_public[:head] + sec._ts.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    with pytest.raises(FedbratsError, match="refusing a public CKKS context that holds a secret key"):
        load_context(with_secret, expect_secret=False)
    assert not sec._ts.has_relin_keys() and not sec._ts.has_galois_keys()  # sites hold none either
    keyed = sec._ts.copy()
    keyed.generate_relin_keys()
    with_relin = fed_public[:head] + keyed.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True
    )
    with pytest.raises(FedbratsError, match="Galois or relinearisation keys"):
        load_context(with_relin, expect_secret=False)


def test_load_context_refuses_mismatched_declared_params(fed):
    # Declare scale 2^30 in fedbrats' header over a TenSEAL context at 2^40.
    tampered = bytearray(fed.public)
    tampered[8 + 4] = 30
    with pytest.raises(FedbratsError, match="does not match the declared parameters"):
        load_context(bytes(tampered), expect_secret=False)


# ---------------------------------------------------------------------------------------------
# K05: packing and sizes


def test_k05_packs_4_70m_parameters_into_1148_vectors(sec, pub):
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 0.01, K05_PARAMS).astype(np.float32) * np.float32(3)  # weight 3 times delta
    chunks = encrypt_update(x, 3.0, sec)
    # ceil((4,700,000 values + 1 weight) / 4096 slots) = 1,148 ciphertexts, not one per value.
    assert len(chunks) == chunk_count(K05_PARAMS, DEFAULT_PARAMS) == math.ceil((K05_PARAMS + 1) / 4096) == 1148
    actual = sum(len(c) for c in chunks)
    predicted = payload_size(K05_PARAMS, DEFAULT_PARAMS)
    assert abs(actual - predicted) <= 0.01 * actual
    assert actual / K05_PARAMS < 33  # bytes per parameter on the wire (target <= 60)
    # The aggregator loads it with its keyless context; a site decrypts it.
    total = EncryptedSum(pub, num_params=K05_PARAMS)
    total.add(chunks)
    s, w = decrypt_aggregate(total.serialize(), sec, K05_PARAMS)
    assert s.dtype == np.float64 and s.shape == (K05_PARAMS,)
    assert w == pytest.approx(3.0, abs=1e-8)
    assert np.abs(s - x.astype(np.float64)).max() < decryption_error_bound(DEFAULT_PARAMS, 1)


@pytest.mark.parametrize("n,count", [(1, 1), (4095, 1), (4096, 2), (8191, 2), (8192, 3)])
def test_chunk_count_includes_the_weight_slot(sec, pub, n, count):
    chunks = encrypt_update(np.full(n, 0.5), 2.0, sec, workers=1)
    assert len(chunks) == chunk_count(n, DEFAULT_PARAMS) == count
    assert sum(len(c) for c in chunks) == pytest.approx(payload_size(n, DEFAULT_PARAMS), rel=0.01)
    total = EncryptedSum(pub)
    total.add(chunks)
    s, w = decrypt_aggregate(total.serialize(), sec, n)
    assert w == pytest.approx(2.0, abs=1e-8) and np.abs(s - 0.5).max() < 1e-8


# ---------------------------------------------------------------------------------------------
# K06 (c): ten sites decrypt to plaintext FedAvg


def test_k06c_ten_sites_decrypt_to_plaintext_fedavg(sec, pub):
    n, sites = 200_000, 10
    rng = np.random.default_rng(10)
    weights = rng.integers(1, 101, sites).astype(np.float64)
    deltas = rng.uniform(-0.1, 0.1, (sites, n)).astype(np.float32)
    total = EncryptedSum(pub, num_params=n, max_sites=sites)
    for w, d in zip(weights, deltas):
        total.add(encrypt_update(w * d.astype(np.float64), w, sec, max_abs_value=0.1, workers=1))
    assert total.sites == sites
    s, w_total = decrypt_aggregate(total.serialize(), sec, n)
    exact_s = (weights[:, None] * deltas.astype(np.float64)).sum(axis=0)
    fedavg = exact_s / weights.sum()
    bound = decryption_error_bound(DEFAULT_PARAMS, sites)
    assert abs(w_total - weights.sum()) <= bound
    assert np.abs(s - exact_s).max() <= bound
    assert np.abs(s / w_total - fedavg).max() < 1e-4  # K06's acceptance; in fact ~1e-11
    assert np.abs(s / w_total - fedavg).max() < 1e-9
    with pytest.raises(CryptoInputError, match="the most the parameters were checked for"):
        total.add(encrypt_update(deltas[0].astype(np.float64), 1.0, sec, workers=1))


def test_worker_processes_give_the_same_result(sec, pub):
    n = 30_000
    x = np.random.default_rng(2).uniform(-1, 1, n)
    chunks = encrypt_update(x, 4.0, sec, workers=2)
    assert len(chunks) == chunk_count(n, DEFAULT_PARAMS)
    s1, w1 = decrypt_aggregate(chunks, sec, n, workers=1)
    s2, w2 = decrypt_aggregate(chunks, sec, n, workers=2)
    assert np.array_equal(s1, s2) and w1 == w2 == pytest.approx(4.0, abs=1e-8)
    assert np.abs(s1 - x).max() < 1e-8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 9000), scale=st.floats(1e-6, 100.0), weight=st.floats(0.5, 400.0))
def test_roundtrip_property(sec, n, scale, weight):
    x = np.random.default_rng(n).uniform(-scale, scale, n)
    s, w = decrypt_aggregate(encrypt_update(x, weight, sec, workers=1), sec, n)
    assert abs(w - weight) <= decryption_error_bound(DEFAULT_PARAMS, 1)
    assert np.abs(s - x).max() <= decryption_error_bound(DEFAULT_PARAMS, 1)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_aggregator_cannot_decrypt(sec, pub):
    n = 100
    chunks = encrypt_update(np.linspace(-1, 1, n), 1.0, sec, workers=1)
    total = EncryptedSum(pub)
    total.add(chunks)
    agg = total.serialize()
    with pytest.raises(FedbratsError, match="needs the secret context"):
        decrypt_aggregate(agg, pub, n)
    # Not only refused by fedbrats: TenSEAL itself cannot decrypt without the key.
    vec = ts.ckks_vector_from(pub._ts, agg[0][CHUNK_HEADER_BYTES:])
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        vec.decrypt()
    status, values = ckks._decrypt_block(pub._ts, [agg[0][CHUNK_HEADER_BYTES:]], [n + 1], pub._first_parms_id, 2.0**40)
    assert (status, values) == (-2, None)  # what decrypt_aggregate turns into CryptoError
    # Nor can it encrypt (it holds no key of any kind), nor sum with a secret context.
    with pytest.raises(FedbratsError, match="needs the secret context"):
        encrypt_update(np.ones(3), 1.0, pub)
    with pytest.raises(FedbratsError, match="must not hold the secret key"):
        EncryptedSum(sec)


def test_fingerprint_mismatch_refused(sec, pub, other_sec):
    n = 5000
    mine = encrypt_update(np.full(n, 0.25), 1.0, sec, workers=1)
    theirs = encrypt_update(np.full(n, 0.25), 1.0, other_sec, workers=1)
    total = EncryptedSum(pub, num_params=n)
    with pytest.raises(CryptoInputError, match="not this federation's"):
        total.add(theirs)
    assert total.sites == 0
    total.add(mine)
    with pytest.raises(CryptoInputError, match="not this federation's"):
        total.add(theirs)
    with pytest.raises(CryptoInputError, match="not this federation's"):
        decrypt_aggregate(total.serialize(), other_sec, n)
    s, w = decrypt_aggregate(total.serialize(), sec, n)
    assert total.sites == 1 and w == pytest.approx(1.0, abs=1e-8)


def test_malformed_updates_refused_and_sum_unchanged(sec, pub):
    n = 9000  # 3 chunks
    good = encrypt_update(np.full(n, 0.5), 2.0, sec, workers=1)
    total = EncryptedSum(pub, num_params=n)
    total.add(good)
    fp = bytes.fromhex(sec.fingerprint)
    # Forged header (our fingerprint) on ciphertexts of other parameters: the ciphertext check
    # (ring, level, scale) refuses them.
    other = make_context(CKKSParams(8192, (50, 40), 30))
    o_sec = load_context(other.secret, expect_secret=True)
    foreign = encrypt_update(np.full(n, 0.5), 2.0, o_sec, workers=1)
    forged = [c[:4] + fp + c[36:] for c in foreign]
    bad_updates = {
        "count": good[:2],
        "order": [good[1], good[0], good[2]],
        "truncated": good[:2] + [good[2][:-100]],
        "garbage": good[:2] + [good[2][:CHUNK_HEADER_BYTES] + b"\x00" * 100],
        "header": good[:2] + [b"XXXX" + good[2][4:]],
        "empty": [],
        "type": "not a list",
        "forged": forged,
        "short last chunk": encrypt_update(np.full(n - 10, 0.5), 2.0, sec, workers=1),
    }
    for name, update in bad_updates.items():
        with pytest.raises(CryptoInputError):
            total.add(update)
    assert total.sites == 1
    s, w = decrypt_aggregate(total.serialize(), sec, n)
    assert w == pytest.approx(2.0, abs=1e-8) and np.abs(s - 0.5).max() < 1e-8
    with pytest.raises(CryptoInputError, match="expected 3 chunks, got 2"):
        decrypt_aggregate(good[:2], sec, n)
    with pytest.raises(CryptoInputError, match="chunk 0 is not a valid ciphertext"):
        decrypt_aggregate(forged, sec, n)
    with pytest.raises(CryptoInputError, match="nothing to serialize"):
        EncryptedSum(pub).serialize()


def test_non_finite_and_out_of_range_values_refused(sec):
    x = np.zeros(1000)
    x[3], x[500] = np.nan, -np.inf
    with pytest.raises(FedbratsError, match="2 of 1000 values are not finite"):
        encrypt_update(x, 1.0, sec)
    y = np.full(1000, 1.0)
    y[:7] = 7.0
    with pytest.raises(CryptoInputError, match="7 of 1000 values exceed the limit max_abs_value 0.004 x weight") as err:
        encrypt_update(y * 0.1, 37.5, sec, max_abs_value=0.1 / 37.5 * 1.5)
    assert "37.5" not in str(err.value)  # the weight is not revealed in messages
    with pytest.raises(CryptoInputError, match="exceed the limit 262144"):
        encrypt_update(np.full(4, 3e5), 1.0, sec)
    for weight in (0.0, -1.0, float("nan"), float("inf"), True, 3e5, "1"):
        with pytest.raises(CryptoInputError, match="weight must be"):
            encrypt_update(np.ones(4), weight, sec)
    for bad in (np.ones((2, 2)), np.ones(4, dtype=np.int64), np.ones(0), [1.0, 2.0]):
        with pytest.raises(CryptoInputError):
            encrypt_update(bad, 1.0, sec)
    with pytest.raises(CryptoInputError, match="workers must be"):
        encrypt_update(np.ones(4), 1.0, sec, workers=-1)


# ---------------------------------------------------------------------------------------------
# Releasing decrypted values


def test_noise_flood_and_rounding():
    x = np.zeros(200_000)
    flooded = noise_flood(x, bits=20)
    assert flooded.shape == x.shape and flooded.dtype == np.float64
    assert np.std(flooded) == pytest.approx(2.0**-20, rel=0.02)
    assert abs(np.mean(flooded)) < 5 * 2.0**-20 / math.sqrt(x.size)
    assert not np.array_equal(noise_flood(x, bits=20), flooded)  # fresh OS randomness each call
    assert noise_flood(np.ones((3, 5)), bits=30).shape == (3, 5)
    assert np.array_equal(round_for_release(np.array([0.1234567, -2.5e-7]), 6), np.array([0.123457, -0.0]))
    for bits in (0, 53, 2.5):
        with pytest.raises(CryptoInputError):
            noise_flood(x, bits=bits)
    with pytest.raises(CryptoInputError):
        noise_flood(np.array([np.nan]), bits=20)
    with pytest.raises(CryptoInputError):
        round_for_release(x, -1)


def test_payload_size_of_longer_chains():
    # Each extra data prime costs bits/2 bytes per parameter: [60, 40, 60] carries 60 + 40 bits.
    assert payload_size(4096 * 10 - 1, CKKSParams(8192, (60, 40, 60), 40)) / (4096 * 10) == pytest.approx(57.4, abs=0.3)
    assert payload_size(4096 * 10 - 1, DEFAULT_PARAMS) / (4096 * 10) == pytest.approx(32.05, abs=0.1)
    with pytest.raises(CryptoInputError):
        payload_size(0, DEFAULT_PARAMS)


def test_context_file_header_layout(fed):
    # Public file: magic, N (u32), scale bits, prime count, prime bits, 32-byte id, TenSEAL bytes.
    assert fed.public[:8] == b"FBCKKSP1"
    assert struct.unpack(">IBB", fed.public[8:14]) == (8192, 40, 2) and fed.public[14:16] == bytes([60, 40])
    assert fed.secret[:8] == b"FBCKKSS1"
    (plen,) = struct.unpack(">I", fed.secret[8:12])
    assert fed.secret[12 : 12 + plen] == fed.public


def test_impossible_total_weight_is_an_opaque_crypto_error(sec):
    # A chunk that decrypts to a weight <= 0 (what a wrong key gives about half the time).
    body = ts.ckks_vector(sec._ts, [0.5, 0.5, -1.0]).serialize()
    chunk = b"FBC1" + bytes.fromhex(sec.fingerprint) + struct.pack(">II", 0, 1) + body
    with pytest.raises(CryptoError) as err:
        decrypt_aggregate([chunk], sec, 2)
    assert str(err.value) == "cryptographic check failed"
