"""Shamir t-of-n secret sharing of 32-byte secrets (Shamir, "How to Share a Secret", CACM 1979).

Field and encoding (a wire-level contract):

* Arithmetic is in the prime field GF(p) with the Mersenne prime ``p = 2**521 - 1``, so one field
  element holds a whole 32-byte secret (a self-mask seed or an X25519 private key) and no secret
  is ever cut into pieces.
* The secret is exactly 32 bytes, read as an unsigned **big-endian** integer ``s < 2**256 < p``.
* A share for holder ``x`` (an integer ``1 <= x < p``; fedbrats uses small positive indices)
  is ``y = f(x) mod p`` for ``f(X) = s + c_1 X + ... + c_{t-1} X^{t-1}``, encoded as exactly
  :data:`SHARE_BYTES` = 66 bytes, unsigned big-endian.  ``x`` travels beside the share (it is the
  key of the mapping), not inside it.
* Coefficients ``c_k`` are drawn uniformly from ``[0, p)`` with rejection sampling over the
  operating system's CSPRNG (``os.urandom``) unless injected (known-answer tests).

Any ``t`` shares determine ``s`` by Lagrange interpolation at 0; any ``t - 1`` shares are
consistent with every possible secret (perfect secrecy).  :func:`combine` also checks that
shares beyond the first ``t`` lie on the same polynomial and that the result is a 32-byte value,
and raises the opaque :class:`~crypto.errors.CryptoError` otherwise.

This module is ours (the finite-field arithmetic is Python's built-in integers); it implements
no cipher, hash or random-number generator.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence

from crypto.errors import CryptoError, CryptoInputError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "combine", "split"]

#: The field modulus, the Mersenne prime 2^521 - 1.
PRIME = (1 << 521) - 1
#: Length of every secret, bytes.
SECRET_BYTES = 32
#: Length of every encoded share, bytes (ceil(521 / 8)).
SHARE_BYTES = (PRIME.bit_length() + 7) // 8


def _check_x(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise CryptoInputError(f"holder index must be an int, got {type(x).__name__}")
    x = int(x)
    if not 1 <= x < PRIME:
        raise CryptoInputError(f"holder index must be in [1, 2^521 - 1), got {x}")
    return x


def _check_threshold(threshold: object) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise CryptoInputError(f"threshold must be an int >= 1, got {threshold!r}")
    return threshold


def _random_element(rng: Callable[[int], bytes]) -> int:
    """A uniform element of [0, p): 521 random bits, rejected (probability 2^-521) if >= p."""
    while True:
        raw = rng(SHARE_BYTES)
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != SHARE_BYTES:
            raise CryptoInputError(f"rng must return {SHARE_BYTES} bytes when asked for {SHARE_BYTES}")
        value = int.from_bytes(raw, "big") & PRIME  # keep the low 521 bits
        if value < PRIME:
            return value


def split(
    secret: bytes,
    *,
    threshold: int,
    holders: Sequence[int],
    coefficients: Sequence[int] | None = None,
    rng: Callable[[int], bytes] | None = None,
) -> dict[int, bytes]:
    """Split a 32-byte secret into shares, any ``threshold`` of which rebuild it.

    Args:
        secret: exactly 32 bytes.
        threshold: ``t``, the number of shares needed, ``1 <= t <= len(holders)``.
        holders: distinct holder indices ``x`` with ``1 <= x < p``.
        coefficients: ``c_1 .. c_{t-1}`` of the polynomial, each in ``[0, p)``; for known-answer
            tests only.  ``None`` draws them at random.
        rng: ``rng(n) -> n random bytes``, used when ``coefficients`` is ``None``; defaults to
            ``os.urandom``.  Must be a CSPRNG outside tests.

    Returns:
        ``{x: share}`` with each share exactly :data:`SHARE_BYTES` bytes.

    Raises:
        CryptoInputError: any argument is out of range.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise CryptoInputError(f"secret must be exactly {SECRET_BYTES} bytes")
    threshold = _check_threshold(threshold)
    xs = [_check_x(x) for x in holders]
    if len(set(xs)) != len(xs):
        raise CryptoInputError("holder indices must be distinct")
    if threshold > len(xs):
        raise CryptoInputError(f"threshold {threshold} exceeds the number of holders {len(xs)}")
    if coefficients is None:
        draw = os.urandom if rng is None else rng
        coeffs = [_random_element(draw) for _ in range(threshold - 1)]
    else:
        coeffs = list(coefficients)
        if len(coeffs) != threshold - 1:
            raise CryptoInputError(f"need {threshold - 1} coefficients for threshold {threshold}, got {len(coeffs)}")
        for c in coeffs:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < PRIME:
                raise CryptoInputError("coefficients must be ints in [0, 2^521 - 1)")
    poly = [int.from_bytes(secret, "big"), *coeffs]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def _lagrange_at(points: list[tuple[int, int]], at: int) -> int:
    """Value at ``at`` of the unique polynomial of degree < len(points) through ``points``."""
    total = 0
    for k, (xk, yk) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != k:
                num = num * (at - xm) % PRIME
                den = den * (xk - xm) % PRIME
        total = (total + yk * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    The ``threshold`` shares with the smallest indices determine the polynomial; every further
    share must lie on it.

    Args:
        shares: ``{x: share}`` as produced by :func:`split`.
        threshold: ``t`` used when splitting.

    Returns:
        The 32-byte secret.

    Raises:
        CryptoInputError: fewer than ``threshold`` shares, an index out of range, or a share of
            the wrong type or length (the message gives counts and indices, never share bytes).
        CryptoError: the shares are inconsistent (a further share is off the polynomial, a share
            is not a field element, or the result is not a 32-byte value).  Opaque.
    """
    threshold = _check_threshold(threshold)
    if not isinstance(shares, Mapping):
        raise CryptoInputError("shares must be a mapping {holder index: share bytes}")
    if len(shares) < threshold:
        raise CryptoInputError(f"{len(shares)} of the {threshold} shares needed are present")
    points = []
    for x, share in shares.items():
        x = _check_x(x)
        if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
            raise CryptoInputError(f"share for holder {x} must be exactly {SHARE_BYTES} bytes")
        points.append((x, int.from_bytes(share, "big")))
    points.sort()
    if any(y >= PRIME for _, y in points):
        raise CryptoError()
    base, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _lagrange_at(base, x) != y:
            raise CryptoError()
    secret = _lagrange_at(base, 0)
    if secret >> (8 * SECRET_BYTES):
        raise CryptoError()
    return secret.to_bytes(SECRET_BYTES, "big")
