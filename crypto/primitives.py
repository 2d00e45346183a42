"""Pure cryptographic primitives: bytes in, bytes out.

Every primitive is a thin wrapper over pyca/cryptography (``cryptography.hazmat``); nothing here
implements a cipher, hash, KDF or random-number generator.  Randomness and nonces are arguments,
so the tests compare bytes with published vectors.  Failures of a cryptographic check raise the
opaque :class:`~crypto.errors.CryptoError`; arguments that cannot be valid (wrong lengths, ranges
or types) raise :class:`~crypto.errors.CryptoInputError`.

Wire-level contracts fixed here (changing any of them is a protocol version bump):

* :func:`derive_key` -- the HKDF salt and info byte layout (documented on the function).
* :func:`prg_uint` -- the mask expansion: ChaCha20 keystream, 16-byte all-zero nonce, read as
  little-endian unsigned words.

References:
    * RFC 5869, "HMAC-based Extract-and-Expand Key Derivation Function (HKDF)", 2010.
    * RFC 7748, "Elliptic Curves for Security" (X25519), 2016.
    * RFC 8032, "Edwards-Curve Digital Signature Algorithm (EdDSA)" (Ed25519), 2017.
    * RFC 8439, "ChaCha20 and Poly1305 for IETF Protocols", 2018.
    * NIST SP 800-38D, "Galois/Counter Mode (GCM) and GMAC", 2007.
"""

from __future__ import annotations

import hmac
import os
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.errors import CryptoError, CryptoInputError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SYMMETRIC_PURPOSES",
    "aead_decrypt",
    "aead_encrypt",
    "derive_key",
    "derive_key_info",
    "derive_key_salt",
    "ed25519_keypair",
    "ed25519_private_raw_from_pem",
    "ed25519_public_raw_from_pem",
    "ed25519_sign",
    "ed25519_verify",
    "hkdf_sha256",
    "length_prefixed",
    "prg_uint",
    "sha256",
    "u64be",
    "worker_threads",
    "x25519_keypair",
    "x25519_shared",
]

#: Length of every symmetric key, seed, X25519/Ed25519 raw key and shared secret, bytes.
KEY_BYTES = 32
#: AES-GCM nonce length, bytes (the 96-bit IV of NIST SP 800-38D §8.2).
NONCE_BYTES = 12
#: AES-GCM tag length, bytes.
TAG_BYTES = 16
#: Ed25519 signature length, bytes.
SIGNATURE_BYTES = 64

#: Domain-separation prefix of every HKDF salt and info string.
DOMAIN = b"fedbrats/v1/"
#: Purposes whose key is the same for (i, j) and (j, i): the two site ids are put in canonical
#: (sorted) order before they enter the info string.  Every other purpose is *directional*:
#: ``i`` is the sender and ``j`` the recipient, in that order.
SYMMETRIC_PURPOSES = frozenset({"pairwise-mask"})
_PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

#: Mask expansion works through the keystream in slices of this many bytes, so memory stays
#: bounded and the zero buffer is reused (one ``update_into`` call per slice).
_PRG_CHUNK = 1 << 22
#: Largest keystream one seed may expand to, bytes.  ChaCha20's 32-bit block counter allows
#: 2^32 blocks of 64 bytes (256 GiB); we stop far below that.
_PRG_MAX_BYTES = 1 << 36
_ZERO_CHUNK = bytes(_PRG_CHUNK)
#: Slice of keystream per seed in :func:`_prg_accumulate` (a multiple of the 64-byte ChaCha20
#: block; small enough that the scratch and the output slice stay in cache).
_PRG_SLICE_BYTES = 1 << 18
#: ChaCha20 block size, bytes.  A keystream split across threads is split at block boundaries:
#: the slice starting at block ``c`` is the keystream of the same key with the block counter
#: (the first, little-endian 32-bit word of ``cryptography``'s 16-byte ChaCha20 nonce) set to ``c``.
_CHACHA_BLOCK = 64

#: Environment variable that sets the worker threads of mask expansion and quantisation.
THREADS_ENV = "FEDBRATS_CRYPTO_THREADS"
#: Worker threads when neither the caller nor :data:`THREADS_ENV` says (capped by the usable CPUs).
DEFAULT_THREADS = 4
#: Below this many words (or values) per thread, work stays on the calling thread: thread
#: start-up would cost more than it saves.
MIN_WORDS_PER_THREAD = 1 << 17

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------
# Worker threads (mask expansion and quantisation release the GIL: OpenSSL's ``update_into``
# and numpy's ufuncs and ``Generator.random(out=...)`` all run without it)


def worker_threads(threads: int | None = None) -> int:
    """How many threads mask expansion (and :func:`crypto.quantize.quantize`) may use.

    The result never changes any output: the work is split into contiguous ranges whose results
    are bit-identical to the single-threaded computation.

    Args:
        threads: requested count, ``>= 1``; ``None`` reads the environment variable
            ``FEDBRATS_CRYPTO_THREADS`` and falls back to :data:`DEFAULT_THREADS`.

    Returns:
        ``threads`` as given when the caller passes it; otherwise ``min(FEDBRATS_CRYPTO_THREADS or
        DEFAULT_THREADS, usable CPUs)``.

    Raises:
        CryptoInputError: ``threads`` (or the environment variable) is not an integer ``>= 1``.
    """
    if threads is not None:
        return _require_int("threads", threads, 1, 1 << 10)
    text = os.environ.get(THREADS_ENV, "").strip()
    wanted = DEFAULT_THREADS
    if text:
        try:
            wanted = int(text)
        except ValueError:
            raise CryptoInputError(f"{THREADS_ENV} must be an integer >= 1, got {text!r}") from None
        wanted = _require_int(THREADS_ENV, wanted, 1, 1 << 10)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(wanted, cpus))


def _split_range(count: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``[0, count)`` cut into at most ``parts`` contiguous ranges of
    nearly equal length, every inner boundary a multiple of ``align`` (no empty range)."""
    parts = max(1, min(parts, count // max(MIN_WORDS_PER_THREAD, align)))
    bounds = [0]
    for i in range(1, parts):
        cut = (count * i // parts) // align * align
        if cut > bounds[-1]:
            bounds.append(cut)
    bounds.append(count)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _run_ranges(fn: Callable[[int, int], _T], ranges: Sequence[tuple[int, int]]) -> list[_T]:
    """``[fn(start, stop) for each range]``, the first on this thread, the others on a thread
    pool.  Every range finishes before this returns; the first exception is re-raised."""
    if len(ranges) <= 1:
        return [fn(a, b) for a, b in ranges]
    with ThreadPoolExecutor(max_workers=len(ranges) - 1, thread_name_prefix="fedbrats-crypto") as pool:
        futures = [pool.submit(fn, a, b) for a, b in ranges[1:]]
        try:
            first = fn(*ranges[0])
        finally:
            done = [f.exception() for f in futures]  # waits for every worker
        errors = [e for e in done if e is not None]
        if errors:
            raise errors[0]
        return [first, *(f.result() for f in futures)]


# ---------------------------------------------------------------------------------------------
# Encoding helpers (used by the byte layouts below and in crypto.secagg)


def _require_bytes(name: str, value: object, length: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CryptoInputError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if length is not None and len(value) != length:
        raise CryptoInputError(f"{name} must be exactly {length} bytes, got {len(value)}")
    return value


def _require_int(name: str, value: object, low: int, high: int) -> int:
    """An ``int`` (never ``bool``) with ``low <= value < high``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CryptoInputError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value < high:
        raise CryptoInputError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def _require_text(name: str, value: object) -> bytes:
    """A non-empty ``str``; returns its UTF-8 encoding."""
    if not isinstance(value, str) or not value:
        raise CryptoInputError(f"{name} must be a non-empty string")
    return value.encode("utf-8")


def length_prefixed(data: bytes) -> bytes:
    """``u32be(len(data)) || data`` -- the one length-prefix encoding used on the wire."""
    if len(data) >= 1 << 32:
        raise CryptoInputError(f"field too long to length-prefix: {len(data)} bytes")
    return struct.pack(">I", len(data)) + data


def u64be(value: int) -> bytes:
    """``value`` as 8 bytes, unsigned big-endian (``0 <= value < 2**64``)."""
    return struct.pack(">Q", _require_int("value", value, 0, 1 << 64))


def sha256(data: bytes) -> bytes:
    """SHA-256 digest of ``data`` (FIPS 180-4)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(_require_bytes("data", data))
    return h.finalize()


# ---------------------------------------------------------------------------------------------
# X25519 (RFC 7748)


def x25519_keypair(private_bytes: bytes | None = None) -> tuple[bytes, bytes]:
    """An X25519 key pair as raw bytes.

    Args:
        private_bytes: 32-byte raw private key (RFC 7748 §5 scalar, clamped by the library), or
            ``None`` for a fresh key from the operating system's CSPRNG via
            ``X25519PrivateKey.generate()``.

    Returns:
        ``(private_raw, public_raw)``, 32 bytes each.

    Raises:
        CryptoInputError: ``private_bytes`` is not 32 bytes.
    """
    if private_bytes is None:
        key = X25519PrivateKey.generate()
    else:
        key = X25519PrivateKey.from_private_bytes(_require_bytes("private_bytes", private_bytes, KEY_BYTES))
    private_raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_raw, public_raw


def x25519_public(private_raw: bytes) -> bytes:
    """The raw public key belonging to a raw X25519 private key (RFC 7748 §6.1)."""
    return x25519_keypair(private_raw)[1]


def x25519_shared(private_raw: bytes, peer_public_raw: bytes) -> bytes:
    """X25519 Diffie--Hellman shared secret (RFC 7748 §6.1).

    The all-zero output (a small-order peer public key, RFC 7748 §6.1 "check") is refused.  The
    raw shared secret is input keying material only: pass it through :func:`derive_key`.

    Args:
        private_raw: own 32-byte raw private key.
        peer_public_raw: the peer's 32-byte raw public key.

    Returns:
        The 32-byte shared secret.

    Raises:
        CryptoInputError: a key is not 32 bytes.
        CryptoError: the peer's public key yields the all-zero secret.
    """
    key = X25519PrivateKey.from_private_bytes(_require_bytes("private_raw", private_raw, KEY_BYTES))
    peer = X25519PublicKey.from_public_bytes(_require_bytes("peer_public_raw", peer_public_raw, KEY_BYTES))
    try:
        shared = key.exchange(peer)
    except ValueError:  # OpenSSL refuses the all-zero result itself
        raise CryptoError() from None
    if hmac.compare_digest(shared, bytes(KEY_BYTES)):  # belt and braces; constant time
        raise CryptoError()
    return shared


# ---------------------------------------------------------------------------------------------
# HKDF (RFC 5869) and the fedbrats key schedule


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 extract-and-expand (RFC 5869 §2) via ``cryptography``'s ``HKDF``.

    Args:
        ikm: input keying material.
        salt: extract salt; ``b""`` is the RFC's "not provided" (HashLen zero bytes).
        info: context and application specific information.
        length: output length in bytes, ``1 <= length <= 255 * 32``.

    Returns:
        ``length`` bytes of output keying material.
    """
    ikm = _require_bytes("ikm", ikm)
    salt = _require_bytes("salt", salt)
    info = _require_bytes("info", info)
    length = _require_int("length", length, 1, 255 * 32 + 1)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_key_salt(federation: str) -> bytes:
    """The HKDF salt of :func:`derive_key`: ``SHA-256(b"fedbrats/v1/salt" || utf8(federation))``."""
    return sha256(DOMAIN + b"salt" + _require_text("federation", federation))


def derive_key_info(*, purpose: str, round: int, i: str, j: str) -> bytes:
    """The HKDF info string of :func:`derive_key` (layout documented there)."""
    if not isinstance(purpose, str) or not _PURPOSE_RE.fullmatch(purpose):
        raise CryptoInputError("purpose must match [a-z0-9][a-z0-9-]{0,63}")
    round_ = _require_int("round", round, 0, 1 << 64)
    bi, bj = _require_text("i", i), _require_text("j", j)
    if bi == bj:
        raise CryptoInputError("i and j must be different site ids")
    if purpose in SYMMETRIC_PURPOSES and bj < bi:
        bi, bj = bj, bi
    return (
        DOMAIN + purpose.encode("ascii") + b"\x00" + u64be(round_) + length_prefixed(bi) + length_prefixed(bj)
    )


def derive_key(shared_secret: bytes, *, purpose: str, federation: str, round: int, i: str, j: str) -> bytes:
    """A 32-byte key for one purpose, one federation, one round and one pair of sites.

    HKDF-SHA256 (RFC 5869) with ``ikm = shared_secret`` and this exact byte layout
    (a wire-level contract; ``||`` is concatenation, strings are UTF-8)::

        salt = SHA-256( b"fedbrats/v1/salt" || federation )                      # 32 bytes
        info = b"fedbrats/v1/" || purpose || 0x00 || u64be(round)
               || u32be(len(i)) || i || u32be(len(j)) || j
        key  = HKDF-SHA256(ikm=shared_secret, salt=salt, info=info, L=32)

    ``purpose`` is ASCII ``[a-z0-9][a-z0-9-]*`` (so the ``0x00`` terminator is unambiguous);
    ``round`` is an unsigned 64-bit big-endian integer.  For a purpose in
    :data:`SYMMETRIC_PURPOSES` (``"pairwise-mask"``) the two site ids are first put in ascending
    order (Python ``str`` order, which equals UTF-8 byte order), so both ends derive the same key;
    for other purposes (``"share-encryption"``) ``i`` is the sender and ``j`` the recipient, so
    the two directions get independent keys.

    Args:
        shared_secret: input keying material, at least 32 bytes (an X25519 shared secret).
        purpose: what the key is for, e.g. ``"pairwise-mask"`` or ``"share-encryption"``.
        federation: federation id.
        round: round number, ``0 <= round < 2**64``.
        i: a site id.
        j: another site id.

    Returns:
        The 32-byte derived key.
    """
    ikm = _require_bytes("shared_secret", shared_secret)
    if len(ikm) < KEY_BYTES:
        raise CryptoInputError(f"shared_secret must be at least {KEY_BYTES} bytes, got {len(ikm)}")
    info = derive_key_info(purpose=purpose, round=round, i=i, j=j)
    return hkdf_sha256(ikm, salt=derive_key_salt(federation), info=info, length=KEY_BYTES)


# ---------------------------------------------------------------------------------------------
# Mask expansion (the PRG of Bonawitz et al. 2017)


def prg_uint(seed: bytes, count: int, *, bits: int, threads: int | None = None) -> np.ndarray:
    """Expand a 32-byte seed into ``count`` uniformly random unsigned integers.

    The stream is the ChaCha20 keystream (RFC 8439 block function; ``cryptography``'s
    ``algorithms.ChaCha20(key=seed, nonce=16 zero bytes)``, i.e. block counter 0 and a zero
    96-bit nonce) obtained by encrypting zero bytes; it is read as consecutive little-endian
    ``uint32`` (``bits=32``) or ``uint64`` (``bits=64``) words.  Every word is exactly uniform on
    ``[0, 2**bits)``, so masks are uniform modulo ``2**bits`` with no reduction bias.  A shorter
    expansion of the same seed is a prefix of a longer one.

    Args:
        seed: exactly 32 bytes (never shortened, never padded).
        count: number of words, ``count >= 0``.
        bits: 32 or 64.
        threads: worker threads (see :func:`worker_threads`; ``None`` = the default).  Long
            expansions are split at ChaCha20 block boundaries; the output does not depend on it.

    Returns:
        A new, writable ``np.ndarray`` of shape ``(count,)`` and dtype ``uint32``/``uint64``.

    Raises:
        CryptoInputError: the seed is not 32 bytes, ``bits`` is not 32/64, or ``count`` is
            negative or asks for more than 64 GiB of keystream.
    """
    seed = _require_bytes("seed", seed, KEY_BYTES)
    dtype = _uint_dtype(bits)
    count = _require_int("count", count, 0, (_PRG_MAX_BYTES // dtype.itemsize) + 1)
    out = np.empty(count, dtype=dtype)
    raw = out.view(np.uint8)
    view = memoryview(raw)
    zeros = memoryview(_ZERO_CHUNK)

    per_block = _CHACHA_BLOCK // dtype.itemsize

    def fill(first: int, last: int) -> None:  # words [first, last), first on a block boundary
        encryptor = _chacha20_at(seed, first // per_block)
        start, stop = first * dtype.itemsize, last * dtype.itemsize
        for pos in range(start, stop, _PRG_CHUNK):
            end = min(pos + _PRG_CHUNK, stop)
            encryptor.update_into(zeros[: end - pos], view[pos:end])

    _run_ranges(fill, _split_range(count, worker_threads(threads), per_block))
    return out  # the dtype is explicitly little-endian, so values are right on any host


def _chacha20_at(seed: bytes, block: int) -> CipherContext:
    """A ChaCha20 encryptor of ``seed`` positioned at keystream block ``block``: the 16-byte
    ``cryptography`` nonce is ``u32le(block) || 12 zero bytes`` (RFC 8439 §2.3 counter, then
    the zero 96-bit nonce), so block 0 is the stream of :func:`prg_uint`."""
    return Cipher(algorithms.ChaCha20(seed, struct.pack("<I", block) + bytes(12)), mode=None).encryptor()


def _prg_accumulate(
    out: np.ndarray,
    terms: list[tuple[bytes, bool]],
    *,
    bits: int,
    threads: int | None = None,
    src: np.ndarray | None = None,
) -> None:
    """In place: ``out = (src or out) + sum(-/+ prg_uint(seed, out.size, bits=bits)) mod 2**bits``.

    ``terms`` is ``[(seed, subtract), ...]``.  Exactly the same words as :func:`prg_uint` (the
    same ChaCha20 keystream of each seed, read in order), but no mask is ever materialised:
    the keystreams are produced slice by slice into one cache-sized scratch buffer and added to
    (or subtracted from) that slice of ``out`` while it is in cache, all seeds per slice.

    With several threads, ``out`` is cut into contiguous ranges that start on ChaCha20 block
    boundaries; each thread expands every seed from that block on (:func:`_chacha20_at`) into
    its own range only.  Addition modulo ``2**bits`` is exact, so the result is bit-identical to
    the single-threaded one.

    Args:
        out: 1-D C-contiguous native ``uint32``/``uint64`` array matching ``bits``, shape ``(P,)``
            (modified).
        terms: ``(32-byte seed, subtract)`` pairs.
        bits: 32 or 64.
        threads: worker threads (see :func:`worker_threads`; ``None`` = the default).
        src: optional 1-D unsigned integer array of shape ``(P,)`` and at most ``bits`` bits to
            start from instead of ``out``'s contents (``out`` is then only written, which saves
            a copy); it is read, never modified.

    Raises:
        CryptoInputError: ``out`` or ``src`` is not such an array, a seed is not 32 bytes, or
            ``threads`` is invalid.
    """
    dtype = _uint_dtype(bits)
    if out.ndim != 1 or out.dtype.itemsize != dtype.itemsize or out.dtype.kind != "u" or not out.flags.c_contiguous:
        raise CryptoInputError(f"out must be a 1-D contiguous uint{bits} array")
    count = _require_int("count", out.size, 0, (_PRG_MAX_BYTES // dtype.itemsize) + 1)
    seeds = [(_require_bytes("seed", seed, KEY_BYTES), bool(subtract)) for seed, subtract in terms]
    if src is not None and (
        src.ndim != 1 or src.shape != out.shape or src.dtype.kind != "u" or src.dtype.itemsize > dtype.itemsize
    ):
        raise CryptoInputError(f"src must be a 1-D unsigned integer array of out's shape and at most {bits} bits")
    if not seeds or not count:
        if src is not None:
            np.copyto(out, src, casting="unsafe")  # same kind, not wider: exact
        return
    words = _PRG_SLICE_BYTES // dtype.itemsize
    per_block = _CHACHA_BLOCK // dtype.itemsize
    zeros = memoryview(_ZERO_CHUNK)

    def accumulate(first: int, last: int) -> None:  # words [first, last), first on a block boundary
        encryptors = [(_chacha20_at(seed, first // per_block), subtract) for seed, subtract in seeds]
        scratch = np.empty(min(words, last - first), dtype=dtype)
        scratch_bytes = memoryview(scratch.view(np.uint8))
        for start in range(first, last, words):
            m = min(words, last - start)
            nbytes = m * dtype.itemsize
            part = out[start : start + m]
            ks = scratch[:m]
            base = part if src is None else src[start : start + m]
            for encryptor, subtract in encryptors:
                encryptor.update_into(zeros[:nbytes], scratch_bytes[:nbytes])
                if subtract:
                    np.subtract(base, ks, out=part, dtype=out.dtype)
                else:
                    np.add(base, ks, out=part, dtype=out.dtype)
                base = part

    _run_ranges(accumulate, _split_range(count, worker_threads(threads), per_block))


def _uint_dtype(bits: int) -> np.dtype:
    if isinstance(bits, bool) or bits not in (32, 64):
        raise CryptoInputError(f"bits must be 32 or 64, got {bits!r}")
    return np.dtype("<u4") if bits == 32 else np.dtype("<u8")


# ---------------------------------------------------------------------------------------------
# AES-256-GCM (NIST SP 800-38D)


def aead_encrypt(key32: bytes, plaintext: bytes, *, nonce: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encryption (NIST SP 800-38D) with a 96-bit nonce and a 128-bit tag.

    The caller owns nonce uniqueness: never encrypt two messages under one key with one nonce.

    Args:
        key32: 32-byte key.
        plaintext: the message.
        nonce: 12-byte nonce.
        aad: associated data, authenticated but not encrypted.

    Returns:
        ``ciphertext || tag`` (``len(plaintext) + 16`` bytes).
    """
    key = _require_bytes("key32", key32, KEY_BYTES)
    nonce = _require_bytes("nonce", nonce, NONCE_BYTES)
    return AESGCM(key).encrypt(nonce, _require_bytes("plaintext", plaintext), _require_bytes("aad", aad))


def aead_decrypt(key32: bytes, ciphertext: bytes, *, nonce: bytes, aad: bytes) -> bytes:
    """AES-256-GCM decryption and tag check (NIST SP 800-38D).

    Args:
        key32: 32-byte key.
        ciphertext: ``ciphertext || tag`` as returned by :func:`aead_encrypt`.
        nonce: the 12-byte nonce used to encrypt.
        aad: the associated data used to encrypt.

    Returns:
        The plaintext.

    Raises:
        CryptoInputError: the key is not 32 bytes (a local mistake, not attacker input).
        CryptoError: anything else is wrong -- tag, nonce, AAD, length or type of the received
            fields.  Opaque: the same error whatever failed.
    """
    key = _require_bytes("key32", key32, KEY_BYTES)
    if not all(isinstance(v, (bytes, bytearray, memoryview)) for v in (ciphertext, nonce, aad)):
        raise CryptoError()
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise CryptoError()
    try:
        return AESGCM(key).decrypt(bytes(nonce), bytes(ciphertext), bytes(aad))
    except InvalidTag:
        raise CryptoError() from None


# ---------------------------------------------------------------------------------------------
# Ed25519 (RFC 8032)


def ed25519_keypair(private_bytes: bytes | None = None) -> tuple[bytes, bytes]:
    """An Ed25519 key pair as raw bytes (RFC 8032 §5.1.5).

    Args:
        private_bytes: the 32-byte secret key (seed), or ``None`` for a fresh one from the
            operating system's CSPRNG via ``Ed25519PrivateKey.generate()``.

    Returns:
        ``(private_raw, public_raw)``, 32 bytes each.
    """
    if private_bytes is None:
        key = Ed25519PrivateKey.generate()
    else:
        key = Ed25519PrivateKey.from_private_bytes(_require_bytes("private_bytes", private_bytes, KEY_BYTES))
    private_raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_raw, public_raw


def ed25519_private_raw_from_pem(pem: bytes) -> bytes:
    """The raw 32-byte secret key of an unencrypted PKCS#8 PEM Ed25519 private key.

    Provisioned identity keys are stored as PEM (see :mod:`crypto.pki`); the signing functions
    here take raw keys.

    Raises:
        CryptoInputError: ``pem`` is not an unencrypted Ed25519 private key (the message never
            contains key material).
    """
    try:
        key = serialization.load_pem_private_key(_require_bytes("pem", pem), password=None)
    except (ValueError, TypeError):
        raise CryptoInputError("not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoInputError("PEM private key is not an Ed25519 key")
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def ed25519_public_raw_from_pem(pem: bytes) -> bytes:
    """The raw 32-byte public key of a SubjectPublicKeyInfo PEM Ed25519 public key.

    Raises:
        CryptoInputError: ``pem`` is not an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(_require_bytes("pem", pem))
    except (ValueError, TypeError):
        raise CryptoInputError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoInputError("PEM public key is not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_sign(private_raw: bytes, message: bytes) -> bytes:
    """Ed25519 signature (RFC 8032 §5.1.6) of ``message``; 64 bytes, deterministic."""
    key = Ed25519PrivateKey.from_private_bytes(_require_bytes("private_raw", private_raw, KEY_BYTES))
    return key.sign(_require_bytes("message", message))


def ed25519_verify(public_raw: bytes, message: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature (RFC 8032 §5.1.7).

    Raises:
        CryptoError: the signature does not verify, or the public key or signature is malformed.
            Opaque: the same error whatever failed.
    """
    values = (public_raw, message, signature)
    if not all(isinstance(v, (bytes, bytearray, memoryview)) for v in values):
        raise CryptoError()
    if len(public_raw) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise CryptoError()
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_raw)).verify(bytes(signature), bytes(message))
    except (InvalidSignature, ValueError):
        raise CryptoError() from None
