"""Known-answer and behaviour tests of crypto.primitives (RFC 5869, 7748, 8032, 8439; SP 800-38D)."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import primitives as P
from crypto.errors import OPAQUE_MESSAGE, CryptoError, CryptoInputError
from fedbrats.errors import FedbratsError

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
h = bytes.fromhex


def _load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# HKDF-SHA256, RFC 5869 Appendix A, test cases 1-3

RFC5869 = [
    pytest.param(
        "0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        id="A.1",
    ),
    pytest.param(
        bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xB0)).hex(), bytes(range(0xB0, 0x100)).hex(), 82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        id="A.2",
    ),
    pytest.param(
        "0b" * 22, "", "", 42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        id="A.3",
    ),
]


@pytest.mark.parametrize("ikm,salt,info,length,okm", RFC5869)
def test_hkdf_rfc5869(ikm, salt, info, length, okm):
    assert P.hkdf_sha256(h(ikm), salt=h(salt), info=h(info), length=length) == h(okm)


def test_hkdf_rejects_bad_length():
    with pytest.raises(CryptoInputError):
        P.hkdf_sha256(b"k" * 32, salt=b"", info=b"", length=0)
    with pytest.raises(CryptoInputError):
        P.hkdf_sha256(b"k" * 32, salt=b"", info=b"", length=255 * 32 + 1)


# ---------------------------------------------------------------------------------------------
# X25519, RFC 7748 §6.1

ALICE_SK = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED_K = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748():
    assert P.x25519_keypair(ALICE_SK) == (ALICE_SK, ALICE_PK)
    assert P.x25519_keypair(BOB_SK) == (BOB_SK, BOB_PK)
    assert P.x25519_shared(ALICE_SK, BOB_PK) == SHARED_K
    assert P.x25519_shared(BOB_SK, ALICE_PK) == SHARED_K


def test_x25519_fresh_keys_agree_and_differ():
    a, b = P.x25519_keypair(), P.x25519_keypair()
    assert a != b and all(len(k) == 32 for k in (*a, *b))
    assert P.x25519_shared(a[0], b[1]) == P.x25519_shared(b[0], a[1])


@pytest.mark.parametrize(
    "low_order",
    [bytes(32), (1).to_bytes(32, "little"),
     h("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")],  # order-8 point
)
def test_x25519_rejects_all_zero_shared_secret(low_order):
    with pytest.raises(CryptoError) as err:
        P.x25519_shared(ALICE_SK, low_order)
    assert str(err.value) == OPAQUE_MESSAGE


def test_x25519_rejects_wrong_lengths():
    with pytest.raises(CryptoInputError):
        P.x25519_keypair(b"\x01" * 31)
    with pytest.raises(CryptoInputError):
        P.x25519_shared(ALICE_SK, BOB_PK + b"\x00")


# ---------------------------------------------------------------------------------------------
# Ed25519, RFC 8032 §7.1 TEST 1 and TEST 2

RFC8032 = [
    pytest.param(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        id="TEST1",
    ),
    pytest.param(
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        id="TEST2",
    ),
]


@pytest.mark.parametrize("sk,pk,msg,sig", RFC8032)
def test_ed25519_rfc8032(sk, pk, msg, sig):
    assert P.ed25519_keypair(h(sk)) == (h(sk), h(pk))
    assert P.ed25519_sign(h(sk), h(msg)) == h(sig)
    P.ed25519_verify(h(pk), h(msg), h(sig))  # does not raise


@pytest.mark.parametrize("sk,pk,msg,sig", RFC8032)
def test_ed25519_every_failure_is_the_same_opaque_error(sk, pk, msg, sig):
    bad_sig = bytearray(h(sig))
    bad_sig[5] ^= 1
    failures = [
        (h(pk), h(msg) + b"x", h(sig)),  # other message
        (h(pk), h(msg), bytes(bad_sig)),  # flipped bit
        (h(pk), h(msg), h(sig)[:63]),  # truncated signature
        (h(pk)[:31], h(msg), h(sig)),  # truncated key
        (ALICE_PK, h(msg), h(sig)),  # other key
        (h(pk), "not bytes", h(sig)),  # wrong type
    ]
    messages = set()
    for args in failures:
        with pytest.raises(CryptoError) as err:
            P.ed25519_verify(*args)
        messages.add(str(err.value))
        # no chained InvalidSignature/ValueError telling which check failed
        assert err.value.__cause__ is None
        assert err.value.__context__ is None or err.value.__suppress_context__
    assert messages == {OPAQUE_MESSAGE}


def test_ed25519_raw_keys_from_provisioned_pem():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sk, pk = RFC8032[0].values[0], RFC8032[0].values[1]
    key = Ed25519PrivateKey.from_private_bytes(h(sk))
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert P.ed25519_private_raw_from_pem(priv_pem) == h(sk)
    assert P.ed25519_public_raw_from_pem(pub_pem) == h(pk)
    ec_key = generate_private_key(SECP256R1())
    ec_pem = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    for bad, fn in [(ec_pem, P.ed25519_private_raw_from_pem), (b"junk", P.ed25519_private_raw_from_pem),
                    (priv_pem, P.ed25519_public_raw_from_pem), (b"junk", P.ed25519_public_raw_from_pem)]:
        with pytest.raises(CryptoInputError) as err:
            fn(bad)
        assert "PRIVATE" not in str(err.value) and sk not in str(err.value)


def test_ed25519_fresh_keys_sign_and_verify():
    sk, pk = P.ed25519_keypair()
    P.ed25519_verify(pk, b"advert", P.ed25519_sign(sk, b"advert"))


# ---------------------------------------------------------------------------------------------
# AES-256-GCM: McGrew & Viega GCM spec test cases 13, 14, 16 (the AES-256 cases of SP 800-38D)

GCM = [
    pytest.param("00" * 32, "", "", "000000000000000000000000", "", "530f8afbc74536b9a963b4f1c4cb738b", id="TC13"),
    pytest.param("00" * 32, "00" * 16, "", "000000000000000000000000",
                 "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919", id="TC14"),
    pytest.param(
        "feffe9928665731c6d6a8f9467308308" * 2,
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        "cafebabefacedbaddecaf888",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
        id="TC16",
    ),
]


@pytest.mark.parametrize("key,pt,aad,iv,ct,tag", GCM)
def test_aes_gcm_known_answer(key, pt, aad, iv, ct, tag):
    out = P.aead_encrypt(h(key), h(pt), nonce=h(iv), aad=h(aad))
    assert out == h(ct) + h(tag)
    assert P.aead_decrypt(h(key), out, nonce=h(iv), aad=h(aad)) == h(pt)


def test_aes_gcm_every_failure_is_the_same_opaque_error():
    key, nonce, aad = bytes(range(32)), bytes(12), b"context"
    ct = P.aead_encrypt(key, b"secret shares", nonce=nonce, aad=aad)
    flipped = bytearray(ct)
    flipped[0] ^= 0x80
    failures = [
        dict(key32=key, ciphertext=bytes(flipped), nonce=nonce, aad=aad),  # body
        dict(key32=key, ciphertext=ct[:-1] + bytes([ct[-1] ^ 1]), nonce=nonce, aad=aad),  # tag
        dict(key32=key, ciphertext=ct, nonce=b"\x01" + nonce[1:], aad=aad),  # nonce
        dict(key32=key, ciphertext=ct, nonce=nonce, aad=b"other"),  # aad
        dict(key32=bytes(32), ciphertext=ct, nonce=nonce, aad=aad),  # key
        dict(key32=key, ciphertext=ct[:15], nonce=nonce, aad=aad),  # too short
        dict(key32=key, ciphertext=ct, nonce=nonce[:8], aad=aad),  # nonce length
        dict(key32=key, ciphertext="text", nonce=nonce, aad=aad),  # type
    ]
    messages = set()
    for kwargs in failures:
        key32, ciphertext = kwargs.pop("key32"), kwargs.pop("ciphertext")
        with pytest.raises(CryptoError) as err:
            P.aead_decrypt(key32, ciphertext, **kwargs)
        messages.add(str(err.value))
        assert isinstance(err.value, FedbratsError)
    assert messages == {OPAQUE_MESSAGE}


def test_aes_gcm_refuses_bad_key_or_nonce_when_encrypting():
    with pytest.raises(CryptoInputError):
        P.aead_encrypt(bytes(16), b"x", nonce=bytes(12), aad=b"")  # AES-128 key: refused
    with pytest.raises(CryptoInputError):
        P.aead_encrypt(bytes(32), b"x", nonce=bytes(16), aad=b"")


# ---------------------------------------------------------------------------------------------
# derive_key: byte layout and stored vector


def _info_by_hand(purpose: str, rnd: int, i: str, j: str) -> bytes:
    bi, bj = i.encode(), j.encode()
    return (b"fedbrats/v1/" + purpose.encode() + b"\x00" + struct.pack(">Q", rnd)
            + struct.pack(">I", len(bi)) + bi + struct.pack(">I", len(bj)) + bj)


def test_derive_key_byte_layout_by_hand():
    secret = bytes(range(32))
    salt = hashlib.sha256(b"fedbrats/v1/salt" + b"fed-A").digest()
    info = _info_by_hand("share-encryption", 258, "site-1", "site-22")
    assert info == (b"fedbrats/v1/share-encryption\x00" + b"\x00\x00\x00\x00\x00\x00\x01\x02"
                    + b"\x00\x00\x00\x06site-1" + b"\x00\x00\x00\x07site-22")
    assert P.derive_key_salt("fed-A") == salt
    assert P.derive_key_info(purpose="share-encryption", round=258, i="site-1", j="site-22") == info
    expected = P.hkdf_sha256(secret, salt=salt, info=info, length=32)
    got = P.derive_key(secret, purpose="share-encryption", federation="fed-A", round=258, i="site-1", j="site-22")
    assert got == expected and len(got) == 32


@pytest.mark.parametrize("case", _load("derive_key.json")["cases"], ids=lambda c: f"{c['purpose']}-{c['round']}")
def test_derive_key_stored_vector(case):
    lo, hi = sorted([case["i"], case["j"]])
    i, j = (lo, hi) if case["purpose"] in P.SYMMETRIC_PURPOSES else (case["i"], case["j"])
    assert h(case["info"]) == _info_by_hand(case["purpose"], case["round"], i, j)
    assert h(case["salt"]) == hashlib.sha256(b"fedbrats/v1/salt" + case["federation"].encode()).digest()
    key = P.derive_key(h(case["shared_secret"]), purpose=case["purpose"], federation=case["federation"],
                       round=case["round"], i=case["i"], j=case["j"])
    assert key.hex() == case["key"]


def test_derive_key_symmetry_and_domain_separation():
    s = bytes(range(32))
    base = dict(federation="fed", round=3)
    k = P.derive_key(s, purpose="pairwise-mask", i="a", j="b", **base)
    assert k == P.derive_key(s, purpose="pairwise-mask", i="b", j="a", **base)  # symmetric
    enc_ab = P.derive_key(s, purpose="share-encryption", i="a", j="b", **base)
    enc_ba = P.derive_key(s, purpose="share-encryption", i="b", j="a", **base)
    others = [
        enc_ab, enc_ba,
        P.derive_key(s, purpose="pairwise-mask", i="a", j="b", federation="fed2", round=3),
        P.derive_key(s, purpose="pairwise-mask", i="a", j="b", federation="fed", round=4),
        P.derive_key(s, purpose="pairwise-mask", i="a", j="c", **base),
        P.derive_key(bytes(32), purpose="pairwise-mask", i="a", j="b", **base),
        # length prefixes: ("ab", "c") and ("a", "bc") must not collide
        P.derive_key(s, purpose="pairwise-mask", i="ab", j="c", **base),
        P.derive_key(s, purpose="pairwise-mask", i="a", j="bc", **base),
    ]
    assert len({k, *others}) == 1 + len(others)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(purpose="Pairwise", federation="f", round=0, i="a", j="b"),  # not [a-z0-9-]
        dict(purpose="pair\x00wise", federation="f", round=0, i="a", j="b"),
        dict(purpose="pairwise-mask", federation="", round=0, i="a", j="b"),
        dict(purpose="pairwise-mask", federation="f", round=-1, i="a", j="b"),
        dict(purpose="pairwise-mask", federation="f", round=2**64, i="a", j="b"),
        dict(purpose="pairwise-mask", federation="f", round=True, i="a", j="b"),
        dict(purpose="pairwise-mask", federation="f", round=0, i="a", j="a"),
        dict(purpose="pairwise-mask", federation="f", round=0, i="", j="b"),
    ],
)
def test_derive_key_refuses_bad_arguments(kwargs):
    with pytest.raises(CryptoInputError):
        P.derive_key(bytes(32), **kwargs)


def test_derive_key_refuses_short_secret():
    with pytest.raises(CryptoInputError):
        P.derive_key(bytes(16), purpose="pairwise-mask", federation="f", round=0, i="a", j="b")


# ---------------------------------------------------------------------------------------------
# prg_uint: mask expansion


def test_prg_rfc8439_chacha20_block_zero():
    # RFC 8439 Appendix A.1, test vector #1: all-zero key and nonce, block counter 0.
    keystream = h(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert P.prg_uint(bytes(32), 16, bits=32).tolist() == list(struct.unpack("<16I", keystream))
    assert P.prg_uint(bytes(32), 8, bits=64).tolist() == list(struct.unpack("<8Q", keystream))


@pytest.mark.parametrize("case", _load("prg.json")["cases"], ids=lambda c: c["name"])
def test_prg_stored_vector_and_raw_chacha20(case):
    seed, count, bits = h(case["seed"]), case["count"], case["bits"]
    words = P.prg_uint(seed, count, bits=bits)
    assert words.dtype == np.dtype(f"<u{bits // 8}") and words.shape == (count,) and words.flags.writeable
    raw = words.tobytes()
    assert hashlib.sha256(raw).hexdigest() == case["sha256_le_bytes"]
    if "words" in case:
        assert words.tolist() == case["words"]
    else:
        assert words[:4].tolist() == case["first_words"] and words[-4:].tolist() == case["last_words"]
    # Cross-check against one raw cryptography call with the same key.
    direct = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(bytes(len(raw)))
    assert raw == direct


def test_prg_prefix_property_and_zero_count():
    seed = bytes(range(32))
    long = P.prg_uint(seed, 3_000_000, bits=32)
    assert np.array_equal(P.prg_uint(seed, 1_234_567, bits=32), long[:1_234_567])
    assert P.prg_uint(seed, 0, bits=64).shape == (0,)


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), bytes(64), "0" * 32])
def test_prg_refuses_any_seed_but_32_bytes(seed):
    with pytest.raises(CryptoInputError):
        P.prg_uint(seed, 4, bits=32)


@pytest.mark.parametrize("bits", [8, 16, 31, 128, True])
def test_prg_refuses_other_widths(bits):
    with pytest.raises(CryptoInputError):
        P.prg_uint(bytes(32), 4, bits=bits)


def test_prg_refuses_negative_count():
    with pytest.raises(CryptoInputError):
        P.prg_uint(bytes(32), -1, bits=32)


@given(seed=st.binary(min_size=32, max_size=32), count=st.integers(0, 300))
@settings(max_examples=40, deadline=None)
def test_prg_deterministic_and_matches_raw_keystream(seed, count):
    a, b = P.prg_uint(seed, count, bits=64), P.prg_uint(seed, count, bits=64)
    assert np.array_equal(a, b)
    direct = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * count))
    assert a.tobytes() == direct


def test_prg_throughput_at_least_100_mb_per_s():
    seed, n = bytes(range(32)), 32 << 20  # 32 MiB of uint64 words per run
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        P.prg_uint(seed, n // 8, bits=64)
        best = min(best, time.perf_counter() - t0)
    assert n / best >= 100e6, f"mask expansion at {n / best / 1e6:.0f} MB/s"
