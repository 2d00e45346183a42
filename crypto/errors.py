"""Errors raised by :mod:`crypto`.

Two kinds, kept apart on purpose (after pyca/cryptography's ``InvalidTag`` / ``InvalidSignature``
and Fernet's single ``InvalidToken``):

* :class:`CryptoError` -- a cryptographic check failed: an AEAD tag did not verify, a signature
  did not verify, a peer's public key is unusable, or reconstructed shares are inconsistent.  It
  is *opaque*: the message is always the same and never says which check failed, which key was
  involved, or how far the check got, so an error can never serve as an oracle.
* :class:`CryptoInputError` -- a caller passed something that cannot be valid whatever the keys:
  a 31-byte key, a threshold larger than the number of holders, fewer shares than the threshold,
  a non-finite update.  These depend only on public sizes and counts, so the message is
  descriptive; it never contains key, seed or share material.
"""

from __future__ import annotations

from fedbrats.errors import FedbratsError

#: The one message every :class:`CryptoError` carries.
OPAQUE_MESSAGE = "cryptographic check failed"


class CryptoError(FedbratsError):
    """A decryption, signature or consistency check failed.  Deliberately says nothing else."""

    def __init__(self) -> None:
        super().__init__(OPAQUE_MESSAGE)


class CryptoInputError(FedbratsError, ValueError):
    """An argument to a :mod:`crypto` function is invalid (wrong length, range, count or type)."""
