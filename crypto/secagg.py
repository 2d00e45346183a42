"""Secure aggregation by pairwise masking: the protocol-level operations daemons import.

Implements the masking, sharing and unmasking of Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning" (CCS 2017), over the sparse neighbour graph of SecAgg+
(Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).
Networking, deadlines and the round state machine live elsewhere; this module works on bytes and
numpy arrays only.

One round, for site ``u`` with neighbours ``N(u)`` (all other sites, or a SecAgg+ graph from
:func:`neighbours`), all arithmetic modulo ``R = 2**bits``:

1. *Advertise keys.*  ``u`` makes two fresh X25519 key pairs -- the mask key ``(s_u^SK, s_u^PK)``
   and the share-encryption key ``(c_u^SK, c_u^PK)`` -- and signs
   :func:`advertisement_bytes` with its provisioned Ed25519 identity key
   (:func:`sign_advertisement` / :func:`verify_advertisement`).
2. *Share keys.*  ``u`` draws a fresh 32-byte self-mask seed ``b_u`` and Shamir-shares both
   ``b_u`` and ``s_u^SK`` t-of-|N(u)| among its neighbours (:func:`share_round_secrets`,
   holder indices from :func:`holder_indices`); each neighbour's :class:`ShareBundle` is
   AES-GCM encrypted under a key derived from ``X25519(c_u^SK, c_v^PK)``
   (:func:`encrypt_shares_for` / :func:`decrypt_shares_from`).
3. *Masked input.*  ``y_u = q_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(k_uv)``
   (:func:`mask_update`) with ``k_uv = derive_key(X25519(s_u^SK, s_v^PK), "pairwise-mask")``
   and ``sign(u, v) = +1 if u < v else -1``, so every pair's masks cancel in the sum.
4. *Unmask.*  For every site ``u`` whose input arrived, survivors reveal shares of ``b_u``; for
   every neighbour ``v`` that dropped before sending its input, survivors reveal shares of
   ``s_v^SK`` -- never both kinds for one site.  The aggregator rebuilds them
   (:func:`recover_self_seed`, :func:`recover_dropped_pairwise`) and :func:`unmask_sum` removes
   the self masks and the dropped sites' dangling pairwise masks.

Every key, seed and share is bytes; none is ever logged or put in an error message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from crypto import shamir
from crypto.errors import CryptoError, CryptoInputError
from crypto.primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    _require_bytes,
    _prg_accumulate,
    _require_int,
    _require_text,
    _uint_dtype,
    aead_decrypt,
    aead_encrypt,
    derive_key,
    ed25519_sign,
    ed25519_verify,
    length_prefixed,
    prg_uint,
    sha256,
    u64be,
    x25519_public,
    x25519_shared,
)

__all__ = [
    "PAIRWISE_PURPOSE",
    "SHARE_PURPOSE",
    "ShareBundle",
    "advertisement_bytes",
    "decrypt_shares_from",
    "encrypt_shares_for",
    "holder_indices",
    "mask_update",
    "neighbours",
    "new_seed",
    "pairwise_mask",
    "recover_dropped_pairwise",
    "recover_self_seed",
    "self_mask",
    "share_round_secrets",
    "sign_advertisement",
    "unmask_sum",
    "verify_advertisement",
]

#: :func:`~crypto.primitives.derive_key` purpose of pairwise mask keys (symmetric in i, j).
PAIRWISE_PURPOSE = "pairwise-mask"
#: :func:`~crypto.primitives.derive_key` purpose of share-bundle keys (directional: sender, recipient).
SHARE_PURPOSE = "share-encryption"
_ADVERTISE_TAG = b"fedbrats/v1/advertise\x00"
_SHARE_AAD_TAG = b"fedbrats/v1/share-encryption\x00"
_GRAPH_TAG = b"fedbrats/v1/neighbour-graph\x00"


def new_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG (``os.urandom``)."""
    return os.urandom(KEY_BYTES)


def _site_ids(name: str, ids: object) -> list[str]:
    ids = list(ids)  # type: ignore[call-overload]
    for s in ids:
        _require_text(f"{name} entry", s)
    if len(set(ids)) != len(ids):
        raise CryptoInputError(f"{name} has duplicate site ids")
    return ids


def _native_uint(bits: int) -> np.dtype:
    return np.dtype(f"u{_uint_dtype(bits).itemsize}")  # native byte order


def _as_modular(q: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(src, out)``: ``q`` checked and flattened (a view when it can be) and a fresh, empty
    C-contiguous native uint32/uint64 array of ``q``'s shape to write the result into."""
    dtype = _native_uint(bits)
    q = np.asarray(q)
    if q.dtype.kind != "u" or q.dtype.itemsize > dtype.itemsize:
        raise CryptoInputError(f"expected unsigned integers of at most {bits} bits, got dtype {q.dtype}")
    return q.reshape(-1), np.empty(q.shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Masks


def pairwise_mask(
    own_id: str, peers: Mapping[str, bytes], *, count: int, bits: int, round: int, federation: str
) -> np.ndarray:
    """Sum of one site's signed pairwise masks, ``sum_j sign(own, j) * PRG(k_own,j) mod 2**bits``.

    Args:
        own_id: this site's id.
        peers: ``{peer id: X25519 shared secret with that peer}`` for the neighbours to mask with.
        count: mask length (number of coordinates).
        bits: 32 or 64 (the modulus is ``2**bits``).
        round: round number.
        federation: federation id.

    Returns:
        ``uint32``/``uint64`` array of shape ``(count,)``.  The masks of a pair are added by the
        site with the smaller id and subtracted by the other, so they cancel in the sum.
    """
    _require_text("own_id", own_id)
    total = np.zeros(_require_int("count", count, 0, 1 << 40), dtype=_native_uint(bits))
    _prg_accumulate(total, _pairwise_terms(own_id, peers, round=round, federation=federation), bits=bits)
    return total


def _pairwise_terms(
    own: str, peers: Mapping[str, bytes], *, round: int, federation: str
) -> list[tuple[bytes, bool]]:
    """``[(k_own,peer, subtract)]`` for :func:`~crypto.primitives._prg_accumulate`: a pair's mask
    is added by the site with the smaller id and subtracted by the other."""
    terms = []
    for peer, secret in peers.items():
        _require_text("peer id", peer)
        if peer == own:
            raise CryptoInputError("a site cannot mask with itself")
        key = derive_key(secret, purpose=PAIRWISE_PURPOSE, federation=federation, round=round, i=own, j=peer)
        terms.append((key, not own < peer))
    return terms


def self_mask(seed32: bytes, count: int, bits: int) -> np.ndarray:
    """The self mask ``PRG(b_u)``: :func:`~crypto.primitives.prg_uint` of the 32-byte seed."""
    return prg_uint(seed32, count, bits=bits)


def mask_update(
    q: np.ndarray,
    *,
    self_seed: bytes,
    pairwise_keys: Mapping[str, bytes],
    own_id: str,
    round: int,
    federation: str,
    bits: int,
    threads: int | None = None,
) -> np.ndarray:
    """Mask a quantised update: ``y = q + PRG(b_u) + sum_j sign(u, j) PRG(k_uj) mod 2**bits``.

    Args:
        q: quantised (and weighted) update, unsigned integers of at most ``bits`` bits, any
            shape (not modified).
        self_seed: the 32-byte self-mask seed ``b_u`` (fresh per round).
        pairwise_keys: ``{neighbour id: X25519 shared secret}``.
        own_id: this site's id.
        round: round number.
        federation: federation id.
        bits: 32 or 64.
        threads: worker threads for the mask expansion
            (:func:`crypto.primitives.worker_threads`; ``None`` = the default).  The result does
            not depend on it.

    Returns:
        The masked update, a new array of ``q``'s shape, dtype ``uint32``/``uint64``.

    Raises:
        CryptoInputError: ``q`` is not unsigned integers of at most ``bits`` bits, a key or id
            is malformed, or ``threads`` is invalid.
    """
    src, y = _as_modular(q, bits)
    # y = q + PRG(b_u) + sum_j sign(u, j) PRG(k_uj) mod 2**bits, accumulated slice by slice (the
    # same words as self_mask and pairwise_mask; addition mod 2**bits is order-free).
    terms = [(_require_bytes("seed", self_seed, KEY_BYTES), False)]
    _require_text("own_id", own_id)
    terms += _pairwise_terms(own_id, pairwise_keys, round=round, federation=federation)
    _prg_accumulate(y.reshape(-1), terms, bits=bits, threads=threads, src=src)
    return y


def unmask_sum(
    masked_sum: np.ndarray,
    *,
    survivors_self_seeds: Mapping[str, bytes],
    dropped_pairwise: Mapping[tuple[str, str], bytes],
    round: int,
    federation: str,
    bits: int,
    threads: int | None = None,
) -> np.ndarray:
    """Remove the masks from the sum of the masked inputs that arrived.

    ``masked_sum = sum_{u in S} y_u`` over the set ``S`` of sites whose masked input arrived.
    Pairwise masks between two members of ``S`` have cancelled; what remains is every
    ``PRG(b_u)`` for ``u in S`` and, for each neighbour pair ``(u, v)`` with ``u in S`` and ``v``
    dropped before sending, the term ``sign(u, v) * PRG(k_uv)``.  Both are subtracted here.

    Args:
        masked_sum: the modular sum of the survivors' masked inputs.
        survivors_self_seeds: ``{u: b_u}`` for every ``u in S`` (reconstructed from shares).
        dropped_pairwise: ``{(u, v): X25519 shared secret of u and v}`` for every survivor ``u``
            and every dropped neighbour ``v`` of ``u`` -- the key is (survivor, dropped), in that
            order.  See :func:`recover_dropped_pairwise`.
        round: round number.
        federation: federation id.
        bits: 32 or 64.
        threads: worker threads for the mask expansion
            (:func:`crypto.primitives.worker_threads`; ``None`` = the default).  The result does
            not depend on it.

    Returns:
        ``sum_{u in S} q_u mod 2**bits``, a new array of ``masked_sum``'s shape
        (``masked_sum`` is not modified).

    Raises:
        CryptoInputError: a site appears both as a survivor and as a dropped site (the aggregator
            must never hold both kinds of secret for one site), or a pair names an unknown
            survivor.
    """
    src, total = _as_modular(masked_sum, bits)
    survivors = set(_site_ids("survivors_self_seeds", survivors_self_seeds.keys()))
    for pair in dropped_pairwise:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise CryptoInputError("dropped_pairwise keys must be (survivor, dropped) pairs")
        u, v = pair
        _require_text("survivor id", u)
        _require_text("dropped id", v)
        if u not in survivors:
            raise CryptoInputError(f"dropped_pairwise names {u!r} as a survivor, but it has no self seed")
        if v in survivors:
            raise CryptoInputError(f"site {v!r} is both a survivor and dropped; refusing to unmask")
    # Subtract every PRG(b_u); undo each dangling pairwise mask (u added it if u < v, else
    # subtracted it).  Accumulated slice by slice: the same words as self_mask / prg_uint.
    terms = [(_require_bytes("seed", seed, KEY_BYTES), True) for seed in survivors_self_seeds.values()]
    for (u, v), secret in dropped_pairwise.items():
        key = derive_key(secret, purpose=PAIRWISE_PURPOSE, federation=federation, round=round, i=u, j=v)
        terms.append((key, u < v))
    _prg_accumulate(total.reshape(-1), terms, bits=bits, threads=threads, src=src)
    return total


# ---------------------------------------------------------------------------------------------
# SecAgg+ neighbour graph (Bell et al. 2020)


def neighbours(site_ids: Sequence[str], *, k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """A symmetric k-regular neighbour graph, deterministic from a public seed (SecAgg+).

    Construction (a wire-level contract -- every party computes the same graph):

    1. Each site gets the label ``SHA-256(b"fedbrats/v1/neighbour-graph\\x00" || seed ||
       u32be(len(id)) || id)``; sorting by (label, id) places the sites on a ring in a random
       order that does not depend on the order of ``site_ids``.
    2. The Harary graph on that ring: each site is joined to the ``k/2`` sites on either side.

    The result is ``k``-regular and symmetric.  If ``k >= n - 1`` the graph is complete (plain
    SecAgg).  Choose ``k`` of order ``log n`` as in Bell et al.; the seed must be fixed before
    the keys are advertised and known to all sites.

    Args:
        site_ids: distinct site ids.
        k: even degree, ``k >= 2``.
        seed: 32-byte public seed.

    Returns:
        ``{site: frozenset of its neighbours}``.
    """
    ids = _site_ids("site_ids", site_ids)
    seed = _require_bytes("seed", seed, KEY_BYTES)
    k = _require_int("k", k, 2, 1 << 31)
    if k % 2:
        raise CryptoInputError(f"k must be even, got {k}")
    n = len(ids)
    if k >= n - 1:
        return {s: frozenset(t for t in ids if t != s) for s in ids}
    ring = sorted(ids, key=lambda s: (sha256(_GRAPH_TAG + seed + length_prefixed(s.encode("utf-8"))), s))
    graph: dict[str, set[str]] = {s: set() for s in ids}
    for pos, s in enumerate(ring):
        for d in range(1, k // 2 + 1):
            t = ring[(pos + d) % n]
            graph[s].add(t)
            graph[t].add(s)
    return {s: frozenset(v) for s, v in graph.items()}


def holder_indices(site_ids: Sequence[str]) -> dict[str, int]:
    """Shamir holder index of each site: ``1 + rank`` in ascending id order (public, canonical)."""
    return {s: i + 1 for i, s in enumerate(sorted(_site_ids("site_ids", site_ids)))}


# ---------------------------------------------------------------------------------------------
# Signed key advertisement


def advertisement_bytes(federation: str, round: int, site: str, dh_public: bytes, share_public: bytes) -> bytes:
    """The exact bytes a site signs to advertise its round keys.

    Layout (every variable field length-prefixed, so no two inputs give the same bytes)::

        b"fedbrats/v1/advertise" || 0x00 || u32be(len(federation)) || federation
        || u64be(round) || u32be(len(site)) || site
        || u32be(32) || dh_public || u32be(32) || share_public

    Args:
        federation: federation id.
        round: round number.
        site: advertising site's id.
        dh_public: raw X25519 public key for pairwise masks (``s_u^PK``).
        share_public: raw X25519 public key for share encryption (``c_u^PK``).
    """
    return (
        _ADVERTISE_TAG
        + length_prefixed(_require_text("federation", federation))
        + u64be(_require_int("round", round, 0, 1 << 64))
        + length_prefixed(_require_text("site", site))
        + length_prefixed(_require_bytes("dh_public", dh_public, KEY_BYTES))
        + length_prefixed(_require_bytes("share_public", share_public, KEY_BYTES))
    )


def sign_advertisement(
    identity_private: bytes, *, federation: str, round: int, site: str, dh_public: bytes, share_public: bytes
) -> bytes:
    """Ed25519 signature over :func:`advertisement_bytes` with the site's identity key."""
    return ed25519_sign(identity_private, advertisement_bytes(federation, round, site, dh_public, share_public))


def verify_advertisement(
    identity_public: bytes,
    signature: bytes,
    *,
    federation: str,
    round: int,
    site: str,
    dh_public: bytes,
    share_public: bytes,
) -> None:
    """Check a key advertisement against the site's provisioned Ed25519 public key.

    Raises:
        CryptoError: the signature does not verify (opaque).
    """
    try:
        message = advertisement_bytes(federation, round, site, dh_public, share_public)
    except CryptoInputError:  # malformed advertised keys are a failed check, not a usage error
        raise CryptoError() from None
    ed25519_verify(identity_public, message, signature)


# ---------------------------------------------------------------------------------------------
# Shares of the round secrets, encrypted per peer


@dataclass(frozen=True)
class ShareBundle:
    """What site u sends neighbour v in the share-keys stage (Bonawitz et al. 2017, round 1).

    Encoded as ``u32be(x) || mask_key_share || self_seed_share`` (4 + 66 + 66 bytes).

    Attributes:
        x: the recipient's Shamir holder index.
        mask_key_share: share of u's X25519 mask private key ``s_u^SK``.
        self_seed_share: share of u's self-mask seed ``b_u``.
    """

    x: int
    mask_key_share: bytes = field(repr=False)
    self_seed_share: bytes = field(repr=False)

    ENCODED_BYTES = 4 + 2 * shamir.SHARE_BYTES

    def to_bytes(self) -> bytes:
        """Fixed-length encoding (:attr:`ENCODED_BYTES` bytes)."""
        x = _require_int("x", self.x, 1, 1 << 32)
        a = _require_bytes("mask_key_share", self.mask_key_share, shamir.SHARE_BYTES)
        b = _require_bytes("self_seed_share", self.self_seed_share, shamir.SHARE_BYTES)
        return x.to_bytes(4, "big") + a + b

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        """Inverse of :meth:`to_bytes`; raises :class:`CryptoError` on a malformed encoding."""
        if len(data) != cls.ENCODED_BYTES:
            raise CryptoError()
        x = int.from_bytes(data[:4], "big")
        if x == 0:
            raise CryptoError()
        n = shamir.SHARE_BYTES
        return cls(x=x, mask_key_share=bytes(data[4 : 4 + n]), self_seed_share=bytes(data[4 + n :]))


def share_round_secrets(
    *,
    self_seed: bytes,
    mask_private: bytes,
    threshold: int,
    holders: Mapping[str, int],
    rng: Callable[[int], bytes] | None = None,
) -> dict[str, ShareBundle]:
    """Shamir-share a site's self-mask seed and mask private key among its neighbours.

    Args:
        self_seed: the 32-byte seed ``b_u``.
        mask_private: the raw 32-byte X25519 mask private key ``s_u^SK``.
        threshold: ``t``, shares needed to rebuild either secret.
        holders: ``{neighbour id: holder index}`` (see :func:`holder_indices`); the site may
            include itself.
        rng: randomness for :func:`crypto.shamir.split` (default ``os.urandom``).

    Returns:
        ``{neighbour id: ShareBundle}``.
    """
    self_seed = _require_bytes("self_seed", self_seed, KEY_BYTES)
    mask_private = _require_bytes("mask_private", mask_private, KEY_BYTES)
    xs = list(holders.values())
    key_shares = shamir.split(mask_private, threshold=threshold, holders=xs, rng=rng)
    seed_shares = shamir.split(self_seed, threshold=threshold, holders=xs, rng=rng)
    return {
        site: ShareBundle(x=x, mask_key_share=key_shares[x], self_seed_share=seed_shares[x])
        for site, x in holders.items()
    }


def _share_aad(federation: str, round: int, sender: str, recipient: str) -> bytes:
    return (
        _SHARE_AAD_TAG
        + length_prefixed(_require_text("federation", federation))
        + u64be(_require_int("round", round, 0, 1 << 64))
        + length_prefixed(_require_text("sender", sender))
        + length_prefixed(_require_text("recipient", recipient))
    )


def encrypt_shares_for(
    peer: str,
    bundle: ShareBundle,
    *,
    own_id: str,
    shared_secret: bytes,
    federation: str,
    round: int,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt a share bundle for one neighbour (AES-256-GCM, NIST SP 800-38D).

    Key: ``derive_key(shared_secret, purpose="share-encryption", i=own_id, j=peer)`` (directional).
    AAD: ``b"fedbrats/v1/share-encryption\\x00" || lp(federation) || u64be(round) ||
    lp(sender) || lp(recipient)``, so a bundle cannot be replayed to another round, federation
    or site, nor reflected back to its sender.

    Args:
        peer: recipient site id.
        bundle: the shares for that recipient.
        own_id: sender (this site's) id.
        shared_secret: ``X25519(c_own^SK, c_peer^PK)``.
        federation: federation id.
        round: round number.
        nonce: 12-byte nonce; ``None`` draws one from ``os.urandom`` (inject only in tests).

    Returns:
        ``nonce || ciphertext || tag``.
    """
    if own_id == peer:
        raise CryptoInputError("a site does not encrypt shares for itself")
    key = derive_key(shared_secret, purpose=SHARE_PURPOSE, federation=federation, round=round, i=own_id, j=peer)
    nonce = os.urandom(NONCE_BYTES) if nonce is None else _require_bytes("nonce", nonce, NONCE_BYTES)
    aad = _share_aad(federation, round, own_id, peer)
    return nonce + aead_encrypt(key, bundle.to_bytes(), nonce=nonce, aad=aad)


def decrypt_shares_from(
    peer: str, blob: bytes, *, own_id: str, shared_secret: bytes, federation: str, round: int
) -> ShareBundle:
    """Decrypt a share bundle that ``peer`` encrypted for this site (inverse of :func:`encrypt_shares_for`).

    Raises:
        CryptoError: the blob is malformed, was not made by ``peer`` for this site in this round
            and federation, or was tampered with.  Opaque.
    """
    if own_id == peer:
        raise CryptoInputError("a site does not decrypt shares from itself")
    key = derive_key(shared_secret, purpose=SHARE_PURPOSE, federation=federation, round=round, i=peer, j=own_id)
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < NONCE_BYTES:
        raise CryptoError()
    aad = _share_aad(federation, round, peer, own_id)
    plain = aead_decrypt(key, bytes(blob[NONCE_BYTES:]), nonce=bytes(blob[:NONCE_BYTES]), aad=aad)
    return ShareBundle.from_bytes(plain)


# ---------------------------------------------------------------------------------------------
# Aggregator side: rebuilding secrets from revealed shares


def recover_self_seed(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Rebuild a surviving site's self-mask seed ``b_u`` from ``{holder index: share}``."""
    return shamir.combine(shares, threshold=threshold)


def recover_dropped_pairwise(
    dropped: str,
    shares: Mapping[int, bytes],
    *,
    threshold: int,
    dropped_public: bytes,
    survivor_publics: Mapping[str, bytes],
) -> dict[tuple[str, str], bytes]:
    """Rebuild a dropped site's mask private key and its shared secrets with the survivors.

    Args:
        dropped: the dropped site's id.
        shares: ``{holder index: share of s_dropped^SK}`` revealed by survivors.
        threshold: ``t``.
        dropped_public: the dropped site's advertised (signed) mask public key ``s_v^PK``; the
            rebuilt private key must match it.
        survivor_publics: ``{survivor id: advertised mask public key}`` for the dropped site's
            neighbours whose masked input arrived.

    Returns:
        ``{(survivor, dropped): shared secret}``, ready for :func:`unmask_sum`.

    Raises:
        CryptoInputError: fewer than ``threshold`` shares.
        CryptoError: the shares are inconsistent or rebuild a key that does not match
            ``dropped_public`` (opaque).
    """
    private = shamir.combine(shares, threshold=threshold)
    if x25519_public(private) != _require_bytes("dropped_public", dropped_public, KEY_BYTES):
        raise CryptoError()
    out = {}
    for survivor, public in survivor_publics.items():
        if survivor == dropped:
            raise CryptoInputError("the dropped site cannot also be a survivor")
        out[(survivor, dropped)] = x25519_shared(private, public)
    return out
