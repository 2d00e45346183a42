"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ graph of Bell et al. 2020): masks cancel,
dropouts are recovered, masked vectors look uniform, and the wire byte layouts are pinned.

The round here is the whole protocol, minus the network: signed key advertisements, Shamir
shares encrypted per neighbour, masked inputs, and unmasking with sites dropping at each stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from crypto import secagg as S
from crypto.errors import OPAQUE_MESSAGE, CryptoError, CryptoInputError
from crypto.primitives import derive_key, ed25519_keypair, prg_uint, x25519_keypair, x25519_shared
from crypto.quantize import QuantParams, check_budget, dequantize_sum, quantize

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "secagg.json").read_text(encoding="utf-8"))
FED = "brats-test"


def _secret(n: int) -> bytes:
    return x25519_shared(x25519_keypair(bytes([n + 1]) * 32)[0], x25519_keypair(bytes([n + 101]) * 32)[1])


# ---------------------------------------------------------------------------------------------
# A whole round without the network


@dataclass
class Site:
    name: str
    identity: tuple[bytes, bytes]
    mask_keys: tuple[bytes, bytes] = field(default_factory=x25519_keypair)
    share_keys: tuple[bytes, bytes] = field(default_factory=x25519_keypair)
    self_seed: bytes = field(default_factory=S.new_seed)
    received: dict = field(default_factory=dict)  # sender -> ShareBundle


def run_round(
    updates: dict[str, np.ndarray],
    *,
    threshold: int,
    bits: int,
    round: int = 5,
    k: int | None = None,
    drop_before_input: frozenset = frozenset(),
    drop_before_unmask: frozenset = frozenset(),
):
    """Run one round; returns (unmasked sum, set of sites whose input it covers)."""
    ids = sorted(updates)
    graph = S.neighbours(ids, k=k if k is not None else 2 * len(ids), seed=b"\x07" * 32)  # complete
    index = S.holder_indices(ids)
    sites = {s: Site(s, ed25519_keypair()) for s in ids}

    # Stage 1: advertise keys, signed; every site checks every neighbour's advertisement.
    adverts = {}
    for s in sites.values():
        sig = S.sign_advertisement(s.identity[0], federation=FED, round=round, site=s.name,
                                   dh_public=s.mask_keys[1], share_public=s.share_keys[1])
        adverts[s.name] = (s.mask_keys[1], s.share_keys[1], sig)
    for s in sites.values():
        for v in graph[s.name]:
            dh, sh, sig = adverts[v]
            S.verify_advertisement(sites[v].identity[1], sig, federation=FED, round=round, site=v,
                                   dh_public=dh, share_public=sh)

    # Stage 2: share keys among the neighbours and the site itself (as in Bonawitz et al.);
    # bundles for others travel encrypted through the aggregator.
    for s in sites.values():
        holders = {v: index[v] for v in graph[s.name] | {s.name}}
        bundles = S.share_round_secrets(self_seed=s.self_seed, mask_private=s.mask_keys[0], threshold=threshold,
                                        holders=holders)
        s.received[s.name] = bundles.pop(s.name)
        for v, bundle in bundles.items():
            blob = S.encrypt_shares_for(v, bundle, own_id=s.name, federation=FED, round=round,
                                        shared_secret=x25519_shared(s.share_keys[0], adverts[v][1]))
            r = sites[v]
            r.received[s.name] = S.decrypt_shares_from(s.name, blob, own_id=v, federation=FED, round=round,
                                                       shared_secret=x25519_shared(r.share_keys[0], adverts[s.name][1]))

    # Stage 3: masked input.
    arrived = [s for s in ids if s not in drop_before_input]
    total = np.zeros(next(iter(updates.values())).shape, dtype=np.uint32 if bits == 32 else np.uint64)
    for name in arrived:
        s = sites[name]
        keys = {v: x25519_shared(s.mask_keys[0], adverts[v][0]) for v in graph[name]}
        total += S.mask_update(updates[name], self_seed=s.self_seed, pairwise_keys=keys, own_id=name,
                               round=round, federation=FED, bits=bits)

    # Stage 4: unmask.  Responders reveal b_u for arrived u, s_v^SK for dropped v -- never both.
    responders = [s for s in arrived if s not in drop_before_unmask]
    seeds, pairwise = {}, {}
    for u in arrived:
        shares = {sites[r].received[u].x: sites[r].received[u].self_seed_share for r in responders
                  if r in graph[u] or r == u}
        seeds[u] = S.recover_self_seed(shares, threshold=threshold)
    for v in drop_before_input:
        shares = {sites[r].received[v].x: sites[r].received[v].mask_key_share for r in responders if r in graph[v]}
        pairwise.update(S.recover_dropped_pairwise(
            v, shares, threshold=threshold, dropped_public=adverts[v][0],
            survivor_publics={u: adverts[u][0] for u in arrived if u in graph[v]}))
    out = S.unmask_sum(total, survivors_self_seeds=seeds, dropped_pairwise=pairwise, round=round,
                       federation=FED, bits=bits)
    return out, set(arrived)


def _updates(n: int, count: int, bits: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if bits == 32 else np.uint64
    return {f"site-{i}": rng.integers(0, 2**bits, size=count, dtype=dtype) for i in range(1, n + 1)}


def _plain_sum(updates, names, bits):
    dtype = np.uint32 if bits == 32 else np.uint64
    total = np.zeros(next(iter(updates.values())).shape, dtype=dtype)
    for n in names:
        total += updates[n]
    return total


# ---------------------------------------------------------------------------------------------
# Masks cancel


@given(n=st.integers(2, 8), bits=st.sampled_from([32, 64]), count=st.integers(0, 300), round=st.integers(0, 2**64 - 1))
@settings(max_examples=40, deadline=None)
def test_pairwise_masks_cancel_mod_2_bits(n, bits, count, round):
    ids = [f"s{i}" for i in range(n)]
    secrets = {frozenset((a, b)): _secret(i * 10 + j) for i, a in enumerate(ids) for j, b in enumerate(ids) if i < j}
    total = np.zeros(count, dtype=np.uint32 if bits == 32 else np.uint64)
    for a in ids:
        peers = {b: secrets[frozenset((a, b))] for b in ids if b != a}
        m = S.pairwise_mask(a, peers, count=count, bits=bits, round=round, federation=FED)
        if count and n > 1:
            assert np.any(m != 0)
        total += m
    assert not np.any(total)


def test_pairwise_mask_signs_follow_id_order():
    s = _secret(1)
    key = derive_key(s, purpose="pairwise-mask", federation=FED, round=0, i="a", j="b")
    m = prg_uint(key, 10, bits=32)
    assert np.array_equal(S.pairwise_mask("a", {"b": s}, count=10, bits=32, round=0, federation=FED), m)
    assert np.array_equal(S.pairwise_mask("b", {"a": s}, count=10, bits=32, round=0, federation=FED),
                          (-m.astype(np.int64) % 2**32).astype(np.uint32))


@given(n=st.integers(2, 8), bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**32))
@settings(max_examples=30, deadline=None)
def test_full_round_without_dropouts_is_the_plain_sum(n, bits, seed):
    updates = _updates(n, 64, bits, seed)
    out, covered = run_round(updates, threshold=n // 2 + 1, bits=bits)
    assert covered == set(updates) and np.array_equal(out, _plain_sum(updates, updates, bits))


# ---------------------------------------------------------------------------------------------
# Dropouts


@st.composite
def _dropout_case(draw):
    n = draw(st.integers(3, 8))
    t = draw(st.integers(1, n))
    ids = [f"site-{i}" for i in range(1, n + 1)]
    before_input = draw(st.sets(st.sampled_from(ids), max_size=n - 1))
    rest = [s for s in ids if s not in before_input]
    before_unmask = draw(st.sets(st.sampled_from(rest), max_size=len(rest) - 1)) if len(rest) > 1 else set()
    return n, t, frozenset(before_input), frozenset(before_unmask)


@given(case=_dropout_case(), bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_dropout_recovery_or_refusal(case, bits, seed):
    """With enough responders the unmasked sum is exactly the plaintext sum of the inputs that
    arrived (dropped sites' pairwise masks removed); with too few, reconstruction refuses."""
    n, t, before_input, before_unmask = case
    updates = _updates(n, 32, bits, seed)
    arrived = [s for s in updates if s not in before_input]
    responders = [s for s in arrived if s not in before_unmask]
    enough = len(responders) >= t  # every site's secrets are shared among all n sites
    event("recovered" if enough else "refused")
    if enough:
        out, covered = run_round(updates, threshold=t, bits=bits,
                                 drop_before_input=before_input, drop_before_unmask=before_unmask)
        assert covered == set(arrived)
        assert np.array_equal(out, _plain_sum(updates, arrived, bits))
    else:
        with pytest.raises(CryptoInputError, match="shares needed are present"):
            run_round(updates, threshold=t, bits=bits,
                      drop_before_input=before_input, drop_before_unmask=before_unmask)


def _k07_updates():
    params = check_budget(QuantParams(clip=1.0, bits=20, modulus_bits=32, max_sites=5, max_weight=100))
    rng = np.random.default_rng(7)
    floats = {f"site-{i}": rng.uniform(-1, 1, size=1000).astype(np.float32) for i in range(1, 6)}
    weights = {s: 10 * i for i, s in enumerate(floats, start=1)}
    qs = {s: quantize(x, params, seed=i, weight=weights[s])[0] for i, (s, x) in enumerate(floats.items())}
    return params, floats, weights, qs


def _fedavg(floats, weights, names):
    return sum(weights[s] * floats[s].astype(np.float64) for s in names) / sum(weights[s] for s in names)


def test_k07a_site_drops_after_masked_input():
    params, floats, weights, qs = _k07_updates()
    out, covered = run_round(qs, threshold=3, bits=params.modulus_bits, drop_before_unmask=frozenset({"site-3"}))
    assert covered == set(qs)  # site 3's input is in the sum
    mean = dequantize_sum(out, params=params, total_weight=sum(weights.values()))
    assert np.max(np.abs(mean - _fedavg(floats, weights, qs))) <= params.step


def test_k07b_site_drops_after_sharing_keys():
    params, floats, weights, qs = _k07_updates()
    out, covered = run_round(qs, threshold=3, bits=params.modulus_bits, drop_before_input=frozenset({"site-5"}))
    survivors = ["site-1", "site-2", "site-3", "site-4"]
    assert covered == set(survivors)
    mean = dequantize_sum(out, params=params, total_weight=sum(weights[s] for s in survivors))
    assert np.max(np.abs(mean - _fedavg(floats, weights, survivors))) <= params.step


def test_k07c_three_sites_drop_and_nothing_is_released():
    params, _, _, qs = _k07_updates()
    with pytest.raises(CryptoInputError, match="2 of the 3 shares needed are present"):
        run_round(qs, threshold=3, bits=params.modulus_bits,
                  drop_before_input=frozenset({"site-4", "site-5"}), drop_before_unmask=frozenset({"site-3"}))


def test_unmask_refuses_a_site_that_is_both_survivor_and_dropped():
    with pytest.raises(CryptoInputError, match="both a survivor and dropped"):
        S.unmask_sum(np.zeros(4, np.uint32), survivors_self_seeds={"a": bytes(32), "b": bytes(32)},
                     dropped_pairwise={("a", "b"): _secret(0)}, round=0, federation=FED, bits=32)
    with pytest.raises(CryptoInputError, match="no self seed"):
        S.unmask_sum(np.zeros(4, np.uint32), survivors_self_seeds={"a": bytes(32)},
                     dropped_pairwise={("c", "b"): _secret(0)}, round=0, federation=FED, bits=32)


def test_recover_dropped_pairwise_checks_the_rebuilt_key():
    sk, pk = x25519_keypair()
    other_pk = x25519_keypair()[1]
    bundles = S.share_round_secrets(self_seed=S.new_seed(), mask_private=sk, threshold=2, holders={"a": 1, "b": 2, "c": 3})
    shares = {b.x: b.mask_key_share for b in bundles.values()}
    survivors = {"a": x25519_keypair()[1]}
    got = S.recover_dropped_pairwise("d", shares, threshold=2, dropped_public=pk, survivor_publics=survivors)
    assert got == {("a", "d"): x25519_shared(sk, survivors["a"])}
    with pytest.raises(CryptoError):  # shares that rebuild a key the site never advertised
        S.recover_dropped_pairwise("d", shares, threshold=2, dropped_public=other_pk, survivor_publics=survivors)
    bad = dict(shares)
    bad[2] = bytes(65) + b"\x01"
    with pytest.raises(CryptoError):  # an inconsistent share
        S.recover_dropped_pairwise("d", bad, threshold=2, dropped_public=pk, survivor_publics=survivors)


def test_mask_update_keeps_shape_and_refuses_floats():
    q = np.arange(12, dtype=np.uint32).reshape(3, 4, order="F")
    y = S.mask_update(q, self_seed=bytes(32), pairwise_keys={}, own_id="a", round=0, federation=FED, bits=32)
    assert y.shape == (3, 4) and y.dtype == np.uint32
    assert np.array_equal(y.reshape(-1), np.ascontiguousarray(q).reshape(-1) + prg_uint(bytes(32), 12, bits=32))
    with pytest.raises(CryptoInputError):
        S.mask_update(q.astype(np.float32), self_seed=bytes(32), pairwise_keys={}, own_id="a", round=0,
                      federation=FED, bits=32)
    with pytest.raises(CryptoInputError):  # uint64 values do not fit a 32-bit modulus
        S.mask_update(q.astype(np.uint64), self_seed=bytes(32), pairwise_keys={}, own_id="a", round=0,
                      federation=FED, bits=32)
    with pytest.raises(CryptoInputError):
        S.pairwise_mask("a", {"a": _secret(0)}, count=3, bits=32, round=0, federation=FED)


# ---------------------------------------------------------------------------------------------
# SecAgg+ neighbour graph


@given(n=st.integers(2, 40), k=st.integers(1, 20).map(lambda x: 2 * x), seed=st.binary(min_size=32, max_size=32),
       order=st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_neighbour_graph_is_symmetric_regular_and_order_independent(n, k, seed, order):
    ids = [f"site-{i}" for i in range(n)]
    graph = S.neighbours(ids, k=k, seed=seed)
    shuffled = list(ids)
    order.shuffle(shuffled)
    assert S.neighbours(shuffled, k=k, seed=seed) == graph
    degree = min(k, n - 1)
    for s, nb in graph.items():
        assert s not in nb and len(nb) == degree
        assert all(s in graph[t] for t in nb)


def test_neighbour_graph_stored_vector_and_seed_dependence():
    v = VECTORS["neighbours"]
    graph = S.neighbours(v["sites"], k=v["k"], seed=bytes.fromhex(v["seed"]))
    assert {s: sorted(nb) for s, nb in graph.items()} == v["graph"]
    ids = [f"site-{i}" for i in range(30)]
    assert S.neighbours(ids, k=4, seed=b"\x01" * 32) != S.neighbours(ids, k=4, seed=b"\x02" * 32)


@pytest.mark.parametrize(
    "ids,k,seed",
    [(["a", "b", "c"], 3, bytes(32)), (["a", "b", "c"], 0, bytes(32)), (["a", "b", "c"], 2, bytes(16)),
     (["a", "a", "c"], 2, bytes(32)), (["a", "", "c"], 2, bytes(32))],
)
def test_neighbour_graph_refuses_bad_arguments(ids, k, seed):
    with pytest.raises(CryptoInputError):
        S.neighbours(ids, k=k, seed=seed)


@given(n=st.integers(6, 14), seed=st.integers(0, 2**32), data=st.data())
@settings(max_examples=30, deadline=None)
def test_secagg_plus_round_with_dropouts(n, seed, data):
    k = data.draw(st.sampled_from([2, 4]), label="k")
    updates = _updates(n, 16, 32, seed)
    dropped = frozenset(data.draw(st.sets(st.sampled_from(sorted(updates)), max_size=1), label="dropped"))
    out, covered = run_round(updates, threshold=2 if k == 2 else 3, bits=32, k=k, drop_before_input=dropped)
    assert covered == set(updates) - dropped
    assert np.array_equal(out, _plain_sum(updates, covered, 32))


# ---------------------------------------------------------------------------------------------
# Masked vectors look uniform and carry no trace of the update


def _chi2_upper(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize("pattern", ["zeros", "ramp", "constant-max"])
def test_masked_vector_is_uniform_and_uncorrelated_with_the_update(pattern):
    n = 1 << 18
    q = {
        "zeros": np.zeros(n, np.uint32),
        "ramp": np.arange(n, dtype=np.uint32) * np.uint32(16381),
        "constant-max": np.full(n, 2**24 - 1, np.uint32),
    }[pattern]
    y = S.mask_update(q, self_seed=bytes(range(32)), pairwise_keys={"b": _secret(1), "c": _secret(2)},
                      own_id="a", round=1, federation=FED, bits=32)
    # Top 8 bits: 256 cells of n/256 = 1024 expected each; fixed seeds, so this cannot flake.
    counts = np.bincount((y >> 24).astype(np.int64), minlength=256)
    expected = n / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < _chi2_upper(255, 4.265)  # p = 1e-5 upper tail
    assert chi2 > _chi2_upper(255, -4.265)  # and not suspiciously regular
    # Low bits too (a weak PRG shows there first).
    low = np.bincount((y & 0xFF).astype(np.int64), minlength=256)
    assert float(np.sum((low - expected) ** 2 / expected)) < _chi2_upper(255, 4.265)
    if pattern == "ramp":
        r = np.corrcoef(q.astype(np.float64), y.astype(np.float64))[0, 1]
        assert abs(r) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Signed key advertisements


def test_advertisement_bytes_stored_vector_and_layout():
    v = VECTORS["advertisement"]
    dh, sh = bytes.fromhex(v["dh_public"]), bytes.fromhex(v["share_public"])
    got = S.advertisement_bytes(v["federation"], v["round"], v["site"], dh, sh)
    assert got.hex() == v["bytes"]
    assert got == (b"fedbrats/v1/advertise\x00" + b"\x00\x00\x00\x0abrats-demo" + (3).to_bytes(8, "big")
                   + b"\x00\x00\x00\x06site-1" + b"\x00\x00\x00\x20" + dh + b"\x00\x00\x00\x20" + sh)


def test_advertisement_bytes_are_unambiguous():
    dh, sh = bytes(range(32)), bytes(range(32, 64))
    variants = [
        ("fed", 1, "site", dh, sh), ("fe", 1, "dsite", dh, sh), ("fed", 1, "site", sh, dh),
        ("fed", 2, "site", dh, sh), ("fed", 1, "site2", dh, sh), ("fed2", 1, "site", dh, sh),
    ]
    assert len({S.advertisement_bytes(*v) for v in variants}) == len(variants)


def test_signed_advertisement_verifies_and_any_change_fails_opaquely():
    sk, pk = ed25519_keypair()
    fields = dict(federation=FED, round=9, site="site-1", dh_public=bytes(range(32)), share_public=bytes(range(1, 33)))
    sig = S.sign_advertisement(sk, **fields)
    S.verify_advertisement(pk, sig, **fields)
    changes = [dict(federation="other"), dict(round=10), dict(site="site-2"), dict(dh_public=bytes(32)),
               dict(share_public=bytes(32)), dict(dh_public=bytes(31))]
    for change in changes:
        with pytest.raises(CryptoError) as err:
            S.verify_advertisement(pk, sig, **{**fields, **change})
        assert str(err.value) == OPAQUE_MESSAGE
    with pytest.raises(CryptoError):
        S.verify_advertisement(ed25519_keypair()[1], sig, **fields)  # someone else's identity


# ---------------------------------------------------------------------------------------------
# Share bundles, encrypted per peer


def test_share_bundle_encryption_stored_vector():
    v = VECTORS["share_bundle"]
    bundle = S.ShareBundle(x=v["x"], mask_key_share=bytes.fromhex(v["mask_key_share"]),
                           self_seed_share=bytes.fromhex(v["self_seed_share"]))
    common = dict(shared_secret=bytes.fromhex(v["shared_secret"]), federation=v["federation"], round=v["round"])
    blob = S.encrypt_shares_for(v["recipient"], bundle, own_id=v["sender"], nonce=bytes.fromhex(v["nonce"]), **common)
    assert blob.hex() == v["blob"]
    assert len(blob) == 12 + S.ShareBundle.ENCODED_BYTES + 16
    assert S.decrypt_shares_from(v["sender"], blob, own_id=v["recipient"], **common) == bundle


def test_share_bundle_is_bound_to_sender_recipient_round_and_federation():
    bundle = S.ShareBundle(x=3, mask_key_share=bytes(range(66)), self_seed_share=bytes(range(1, 67)))
    secret = _secret(5)
    blob = S.encrypt_shares_for("bob", bundle, own_id="alice", shared_secret=secret, federation=FED, round=4)
    ok = dict(own_id="bob", shared_secret=secret, federation=FED, round=4)
    assert S.decrypt_shares_from("alice", blob, **ok) == bundle
    tampered = bytearray(blob)
    tampered[20] ^= 1
    attempts = [
        ("alice", blob, {**ok, "round": 5}),
        ("alice", blob, {**ok, "federation": "other"}),
        ("alice", blob, {**ok, "own_id": "carol"}),  # wrong recipient
        ("carol", blob, ok),  # wrong sender
        ("bob", blob, {**ok, "own_id": "alice"}),  # reflected back to its sender
        ("alice", blob, {**ok, "shared_secret": _secret(6)}),
        ("alice", bytes(tampered), ok),
        ("alice", blob[:11], ok),
        ("alice", blob[:-1], ok),
    ]
    for sender, data, kwargs in attempts:
        with pytest.raises(CryptoError) as err:
            S.decrypt_shares_from(sender, data, **kwargs)
        assert str(err.value) == OPAQUE_MESSAGE


def test_share_bundles_get_fresh_nonces_and_hide_shares_in_repr():
    bundle = S.ShareBundle(x=1, mask_key_share=b"\xaa" * 66, self_seed_share=b"\xbb" * 66)
    a = S.encrypt_shares_for("b", bundle, own_id="a", shared_secret=_secret(1), federation=FED, round=0)
    b = S.encrypt_shares_for("b", bundle, own_id="a", shared_secret=_secret(1), federation=FED, round=0)
    assert a[:12] != b[:12] and a != b
    assert "aa" not in repr(bundle).lower().replace("share", "") and "\\xaa" not in repr(bundle)


def test_holder_indices_are_canonical():
    assert S.holder_indices(["site-3", "site-1", "site-2"]) == {"site-1": 1, "site-2": 2, "site-3": 3}
    with pytest.raises(CryptoInputError):
        S.holder_indices(["a", "a"])
