"""Shamir t-of-n sharing over GF(2^521 - 1): known answers and properties (Shamir 1979)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import shamir
from crypto.errors import OPAQUE_MESSAGE, CryptoError, CryptoInputError

P = shamir.PRIME
VECTORS = Path(__file__).resolve().parents[1] / "vectors"
CASES = json.loads((VECTORS / "shamir.json").read_text(encoding="utf-8"))["cases"]


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def test_field_and_sizes():
    assert P == 2**521 - 1 and shamir.SHARE_BYTES == 66 and shamir.SECRET_BYTES == 32


def test_hand_computable_case():
    # f(x) = 1234 + 166 x + 94 x^2 (the textbook example): f(1..6) by hand.
    shares = shamir.split((1234).to_bytes(32, "big"), threshold=3, holders=[1, 2, 3, 4, 5, 6], coefficients=[166, 94])
    assert {x: _int(s) for x, s in shares.items()} == {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    assert all(len(s) == 66 for s in shares.values())
    for subset in itertools.combinations(shares, 3):
        assert _int(shamir.combine({x: shares[x] for x in subset}, threshold=3)) == 1234


def test_coefficient_wraps_modulo_p():
    # f(x) = 5 + (p - 1) x  ->  f(1) = 4, f(2) = 3 (mod p)
    shares = shamir.split((5).to_bytes(32, "big"), threshold=2, holders=[1, 2], coefficients=[P - 1])
    assert _int(shares[1]) == 4 and _int(shares[2]) == 3
    assert _int(shamir.combine(shares, threshold=2)) == 5


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c['threshold']}-n{len(c['holders'])}-{c['secret'][:8]}")
def test_stored_vector(case):
    secret = bytes.fromhex(case["secret"])
    shares = shamir.split(secret, threshold=case["threshold"], holders=case["holders"],
                          coefficients=[int(c) for c in case["coefficients"]])
    assert {str(x): s.hex() for x, s in shares.items()} == case["shares"]
    # Recompute the polynomial independently of shamir.split.
    coeffs = [_int(secret)] + [int(c) for c in case["coefficients"]]
    for x, s in shares.items():
        assert _int(s) == sum(c * pow(x, k, P) for k, c in enumerate(coeffs)) % P
    assert shamir.combine({int(x): bytes.fromhex(s) for x, s in case["shares"].items()},
                          threshold=case["threshold"]) == secret


@st.composite
def _sharing(draw):
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    holders = draw(st.lists(st.integers(1, 2**32), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=32, max_size=32))
    return secret, t, holders


@given(_sharing(), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_any_t_of_n_shares_rebuild_the_secret(sharing, rnd):
    secret, t, holders = sharing
    shares = shamir.split(secret, threshold=t, holders=holders)
    for size in (t, len(holders)):
        chosen = rnd.sample(holders, size)
        assert shamir.combine({x: shares[x] for x in chosen}, threshold=t) == secret


@given(_sharing(), st.binary(min_size=32, max_size=32), st.data())
@settings(max_examples=60, deadline=None)
def test_t_minus_1_shares_are_consistent_with_every_secret(sharing, candidate, data):
    """Perfect secrecy, constructively: for any t-1 shares and ANY candidate secret s' there is a
    degree-(t-1) polynomial through (0, s') and those shares, so they say nothing about s."""
    secret, t, holders = sharing
    if t < 2:
        return
    coeffs = data.draw(st.lists(st.integers(0, P - 1), min_size=t - 1, max_size=t - 1), label="coefficients")
    shares = shamir.split(secret, threshold=t, holders=holders, coefficients=coeffs)
    seen = data.draw(st.permutations(holders), label="order")[: t - 1]
    # g(X) = f(X) + (s' - s) * prod_k (1 - X / x_k): g(0) = s', g(x_k) = f(x_k) for the seen x_k.
    basis = [1]  # coefficients of prod_k (1 - X / x_k), lowest degree first
    for xk in seen:
        inv = pow(xk, -1, P)
        basis = [(a - inv * b) % P for a, b in zip(basis + [0], [0] + basis)]
    delta = (_int(candidate) - _int(secret)) % P
    new_coeffs = [(c + delta * b) % P for c, b in zip(coeffs, basis[1:])]
    forged = shamir.split(candidate, threshold=t, holders=holders, coefficients=new_coeffs)
    assert {x: forged[x] for x in seen} == {x: shares[x] for x in seen}


@given(_sharing())
@settings(max_examples=30, deadline=None)
def test_t_minus_1_shares_are_refused(sharing):
    secret, t, holders = sharing
    if t < 2:
        return
    shares = shamir.split(secret, threshold=t, holders=holders)
    partial = {x: shares[x] for x in holders[: t - 1]}
    with pytest.raises(CryptoInputError, match=f"{t - 1} of the {t} shares needed"):
        shamir.combine(partial, threshold=t)


def test_too_few_shares_message_counts_them():
    shares = shamir.split(bytes(32), threshold=3, holders=[1, 2, 3, 4, 5])
    with pytest.raises(CryptoInputError, match="2 of the 3 shares needed are present"):
        shamir.combine({1: shares[1], 4: shares[4]}, threshold=3)


def test_default_randomness_is_fresh_and_rng_is_injectable():
    secret = bytes(range(32))
    a = shamir.split(secret, threshold=3, holders=[1, 2, 3])
    b = shamir.split(secret, threshold=3, holders=[1, 2, 3])
    assert a != b  # fresh coefficients every time (probability of equality 2^-1042)

    def counter_rng(n, state=[0]):
        state[0] += 1
        return state[0].to_bytes(n, "big")

    c = shamir.split(secret, threshold=3, holders=[1, 2, 3], rng=counter_rng)
    assert c == shamir.split(secret, threshold=3, holders=[1, 2, 3], coefficients=[1, 2])


def test_rng_draws_above_p_are_rejected():
    draws = iter([b"\xff" * 66, (7).to_bytes(66, "big")])  # first masks to p itself -> redrawn
    shares = shamir.split(bytes(32), threshold=2, holders=[1, 2], rng=lambda n: next(draws))
    assert _int(shares[1]) == 7 and _int(shares[2]) == 14


def test_extra_shares_must_be_consistent():
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, holders=[1, 2, 3, 4, 5])
    assert shamir.combine(shares, threshold=3) == secret
    for victim in shares:  # one corrupted share anywhere, base set or extra
        bad = dict(shares)
        bad[victim] = ((_int(shares[victim]) + 1) % P).to_bytes(66, "big")
        with pytest.raises(CryptoError) as err:
            shamir.combine(bad, threshold=3)
        assert str(err.value) == OPAQUE_MESSAGE


def test_wrong_base_is_detected_by_the_32_byte_check():
    shares = shamir.split(bytes(range(32)), threshold=3, holders=[1, 2, 3])
    bad = dict(shares)
    bad[2] = (int.from_bytes(hashlib.sha512(b"garbage").digest(), "big") % P).to_bytes(66, "big")
    with pytest.raises(CryptoError):  # a garbage share moves f(0) to a random field element >= 2^256
        shamir.combine(bad, threshold=3)


@pytest.mark.parametrize(
    "shares",
    [
        {0: bytes(66), 1: bytes(66)},  # x = 0 would be the secret itself
        {-1: bytes(66), 1: bytes(66)},
        {P: bytes(66), 1: bytes(66)},  # x = p is x = 0
        {True: bytes(66), 2: bytes(66)},  # bool is not an index
        {"1": bytes(66), 2: bytes(66)},
        {1: bytes(65), 2: bytes(66)},  # wrong length
        {1: "00" * 66, 2: bytes(66)},  # wrong type
    ],
)
def test_combine_refuses_malformed_input(shares):
    with pytest.raises(CryptoInputError):
        shamir.combine(shares, threshold=2)


def test_combine_share_not_a_field_element_is_a_crypto_error():
    with pytest.raises(CryptoError):
        shamir.combine({1: b"\xff" * 66, 2: bytes(66)}, threshold=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(secret=bytes(31), threshold=2, holders=[1, 2]),
        dict(secret=bytes(33), threshold=2, holders=[1, 2]),
        dict(secret=bytes(32), threshold=0, holders=[1, 2]),
        dict(secret=bytes(32), threshold=3, holders=[1, 2]),
        dict(secret=bytes(32), threshold=2, holders=[1, 1]),
        dict(secret=bytes(32), threshold=2, holders=[0, 1]),
        dict(secret=bytes(32), threshold=2, holders=[1, 2], coefficients=[1, 2]),
        dict(secret=bytes(32), threshold=2, holders=[1, 2], coefficients=[P]),
        dict(secret=bytes(32), threshold=2, holders=[1, 2], coefficients=[-1]),
        dict(secret=bytes(32), threshold=2, holders=[1, 2], rng=lambda n: bytes(n - 1)),
    ],
)
def test_split_refuses_bad_arguments(kwargs):
    with pytest.raises(CryptoInputError):
        shamir.split(**kwargs)


def test_errors_never_contain_share_bytes():
    shares = shamir.split(b"\xab" * 32, threshold=3, holders=[1, 2, 3])
    for broken in ({1: shares[1]}, {1: shares[1], 2: shares[2][:-1], 3: shares[3]}):
        with pytest.raises(CryptoInputError) as err:
            shamir.combine(broken, threshold=3)
        text = str(err.value)
        assert shares[1].hex()[-16:] not in text and "ab" * 8 not in text
