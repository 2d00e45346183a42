"""Regenerate the fedbrats crypto known-answer vectors in this folder.

Run once, from the repository root, and commit the JSON it writes::

    python tests/vectors/make_vectors.py

The vectors pin wire-level contracts -- the mask expansion (``prg.json``), the key schedule
(``derive_key.json``), Shamir shares with fixed coefficients (``shamir.json``) and the SecAgg
byte layouts (``secagg.json``) -- so a change to any of them fails the tests instead of
silently breaking interoperability between sites running different versions.  Regenerating is a
protocol change: bump the ``fedbrats/v1`` domain string at the same time.

All inputs are fixed here; nothing random.  The tests also check the independent parts against
published vectors (RFC 8439 for ChaCha20) and rebuild the byte layouts by hand.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from crypto import primitives, secagg, shamir  # noqa: E402


def _prg() -> dict:
    cases = []
    for name, seed, count, bits in [
        ("ascending seed, 8 x uint32", bytes(range(32)), 8, 32),
        ("ascending seed, 8 x uint64", bytes(range(32)), 8, 64),
        ("0xa5 seed, 5 x uint32", bytes([0xA5]) * 32, 5, 32),
        ("descending seed, 1000003 x uint32 (crosses a 4 MiB slice)", bytes(range(255, 223, -1)), 1_000_003, 32),
        ("descending seed, 600001 x uint64 (crosses a 4 MiB slice)", bytes(range(255, 223, -1)), 600_001, 64),
    ]:
        words = primitives.prg_uint(seed, count, bits=bits)
        raw = words.astype(words.dtype.newbyteorder("<")).tobytes()
        case = {"name": name, "seed": seed.hex(), "count": count, "bits": bits,
                "sha256_le_bytes": hashlib.sha256(raw).hexdigest()}
        if count <= 16:
            case["words"] = [int(w) for w in words]
        else:
            case["first_words"] = [int(w) for w in words[:4]]
            case["last_words"] = [int(w) for w in words[-4:]]
        cases.append(case)
    return {"description": "prg_uint: ChaCha20 keystream, zero 16-byte nonce, little-endian words", "cases": cases}


def _derive_key() -> dict:
    cases = []
    for purpose, federation, rnd, i, j in [
        ("pairwise-mask", "brats-demo", 0, "site-1", "site-2"),
        ("pairwise-mask", "brats-demo", 7, "site-2", "site-1"),
        ("share-encryption", "brats-demo", 7, "site-2", "site-1"),
        ("share-encryption", "fédération", 2**64 - 1, "hôpital-α", "site-β"),
    ]:
        secret = hashlib.sha256(f"{purpose}|{federation}|{rnd}|{i}|{j}".encode()).digest()
        cases.append({
            "shared_secret": secret.hex(), "purpose": purpose, "federation": federation, "round": rnd,
            "i": i, "j": j,
            "salt": primitives.derive_key_salt(federation).hex(),
            "info": primitives.derive_key_info(purpose=purpose, round=rnd, i=i, j=j).hex(),
            "key": primitives.derive_key(secret, purpose=purpose, federation=federation, round=rnd, i=i, j=j).hex(),
        })
    return {"description": "derive_key: HKDF-SHA256 salt/info layout and output", "cases": cases}


def _shamir() -> dict:
    cases = []
    for secret, threshold, holders, coefficients in [
        ((1234).to_bytes(32, "big"), 3, [1, 2, 3, 4, 5, 6], [166, 94]),
        (bytes(range(1, 33)), 3, [1, 2, 3, 4, 5], [2**520 + 12345, 2**300 + 7]),
        (bytes([0xFF]) * 32, 4, [2, 3, 5, 7, 11, 13, 17],
         [shamir.PRIME - 1, shamir.PRIME - 2, int.from_bytes(hashlib.sha512(b"c3").digest(), "big") % shamir.PRIME]),
    ]:
        shares = shamir.split(secret, threshold=threshold, holders=holders, coefficients=coefficients)
        cases.append({
            "secret": secret.hex(), "threshold": threshold, "holders": holders,
            "coefficients": [str(c) for c in coefficients],
            "shares": {str(x): s.hex() for x, s in shares.items()},
        })
    return {"description": "shamir.split over GF(2^521-1), big-endian, 66-byte shares", "cases": cases}


def _secagg() -> dict:
    dh = hashlib.sha256(b"dh").digest()
    share = hashlib.sha256(b"share").digest()
    adv = secagg.advertisement_bytes("brats-demo", 3, "site-1", dh, share)
    graph_seed = hashlib.sha256(b"graph").digest()
    sites = [f"site-{n}" for n in range(1, 11)]
    graph = secagg.neighbours(sites, k=4, seed=graph_seed)
    bundle = secagg.ShareBundle(x=2, mask_key_share=bytes(range(66)), self_seed_share=bytes(range(66, 132)))
    secret = hashlib.sha256(b"share-secret").digest()
    nonce = bytes(range(12))
    blob = secagg.encrypt_shares_for("site-2", bundle, own_id="site-1", shared_secret=secret,
                                     federation="brats-demo", round=3, nonce=nonce)
    return {
        "advertisement": {"federation": "brats-demo", "round": 3, "site": "site-1", "dh_public": dh.hex(),
                          "share_public": share.hex(), "bytes": adv.hex()},
        "neighbours": {"sites": sites, "k": 4, "seed": graph_seed.hex(),
                       "graph": {s: sorted(v) for s, v in graph.items()}},
        "share_bundle": {"sender": "site-1", "recipient": "site-2", "federation": "brats-demo", "round": 3,
                         "shared_secret": secret.hex(), "nonce": nonce.hex(), "x": 2,
                         "mask_key_share": bundle.mask_key_share.hex(),
                         "self_seed_share": bundle.self_seed_share.hex(), "blob": blob.hex()},
    }


def main() -> None:
    for name, make in [("prg", _prg), ("derive_key", _derive_key), ("shamir", _shamir), ("secagg", _secagg)]:
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(make(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
