"""Cryptography for fedbrats' secure aggregation, in two layers.

Primitives (bytes in, bytes out; randomness, nonces and coefficients are arguments so tests can
pin them to published vectors; nothing here is hand-rolled -- every cipher, hash, KDF and
random-number generator comes from pyca/cryptography or the operating system):

* :mod:`crypto.primitives` -- X25519 (RFC 7748), Ed25519 (RFC 8032), HKDF-SHA256 (RFC 5869) and
  the fedbrats key schedule :func:`~crypto.primitives.derive_key`, AES-256-GCM
  (NIST SP 800-38D), and the ChaCha20 mask expansion :func:`~crypto.primitives.prg_uint`.
* :mod:`crypto.shamir` -- Shamir t-of-n sharing of 32-byte secrets over GF(2^521 - 1)
  (Shamir, CACM 1979).
* :mod:`crypto.quantize` -- fixed-point quantisation with stochastic rounding and the bit-budget
  check for masked weighted sums.

Protocol (what the node and aggregator daemons import; fixes every parameter):

* :mod:`crypto.secagg` -- pairwise and self masks, masking and unmasking with dropouts
  (Bonawitz et al., CCS 2017), the SecAgg+ neighbour graph (Bell et al., CCS 2020), signed key
  advertisements, and per-peer encryption of share bundles.

Provisioning (offline, once per federation; not used inside a round):

* :mod:`crypto.pki` -- the federation CA, mTLS certificates and Ed25519 identity keys (PEM);
  :func:`~crypto.primitives.ed25519_private_raw_from_pem` and
  :func:`~crypto.primitives.ed25519_public_raw_from_pem` turn identity keys into the raw keys
  that :func:`~crypto.secagg.sign_advertisement` / :func:`~crypto.secagg.verify_advertisement`
  take.

Errors: :class:`crypto.errors.CryptoError` (opaque: a cryptographic check failed) and
:class:`crypto.errors.CryptoInputError` (an argument cannot be valid), both
:class:`fedbrats.errors.FedbratsError`.  Nothing in this package logs keys, seeds or shares.
"""
