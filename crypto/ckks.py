"""Homomorphic aggregation with CKKS (TenSEAL): the protocol-level operations daemons import.

Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers"
(ASIACRYPT 2017), through TenSEAL (Benaissa et al., 2021) on Microsoft SEAL.  Networking and the
round state machine live elsewhere; this module works on bytes and numpy arrays only.

Trust model (as NVIDIA FLARE's): every site holds the same secret key; the aggregator holds a
context with the parameters only -- no secret key, no public key, no Galois or relinearisation
keys -- and can do nothing but add ciphertexts.  One round::

    site i:      chunks_i = encrypt_update(w_i * delta_i, w_i, secret_ctx)    # list[bytes]
    aggregator:  acc = EncryptedSum(public_ctx); acc.add(chunks_i) for each i; acc.serialize()
    site:        S, W = decrypt_aggregate(aggregate, secret_ctx, num_params); mean = S / W

Packing.  A site's update ``x`` (already multiplied by its FedAvg weight ``w``) and ``w`` itself
form one vector of ``len(x) + 1`` values -- the weight is the *last slot of the last chunk*, so it
is encrypted with the update and never travels in plaintext metadata.  That vector is cut into
``ceil((len(x) + 1) / (N/2))`` ``ckks_vector``s of ``N/2`` slots (:func:`chunk_count`): 4.70M
parameters at N = 8192 make 1,148 ciphertexts, not one per value.

Parameters (:class:`CKKSParams`, checked by :func:`check_params` at provisioning).  Addition needs
no rescaling, so a fedbrats chain is two primes: the *first* prime is the whole ciphertext modulus
and the *last* is the special prime SEAL needs to build a context (TenSEAL generates
relinearisation keys with it) and that no ciphertext ever carries.  Every extra middle prime only
serves a rescale after a multiplication, which fedbrats never does, and costs ``bits/2`` bytes
per parameter on the wire.  Encryption is *symmetric* (with the shared secret key): its fresh
error is about ten times smaller than public-key encryption's, and the aggregator context then
holds no key material at all.

Why fedbrats never multiplies ciphertexts (case K06 a).  The textbook weighted average
``(1/sum w) * sum_i w_i * Enc(x_i)`` needs the aggregator to know every ``w_i`` and ``sum w``
in plaintext (the weights are then public metadata), and costs one rescale -- one prime -- per
multiplication: under ``[60, 40, 60]`` and scale 2^40 the product ``w_i * Enc(x_i)`` uses up the
only middle prime, and the second product by ``1/sum w`` leaves its scale at 2^80, above what the
remaining 60-bit modulus can hold (TenSEAL raises ``scale out of bounds``).  A chain deep enough
for it needs more primes, hence larger ciphertexts, more noise and a division that CKKS can only
approximate.  fedbrats instead has each site encrypt ``w_i * x_i`` and ``w_i``; the aggregator
only adds; the sites divide ``sum w_i x_i`` by ``sum w_i`` *after* decryption, in float64.

Headroom and precision.  With the slot values bounded by ``B``, every plaintext coefficient is
bounded by ``B * 2^scale``; decryption is correct while the coefficient plus the error stays below
half the ciphertext modulus.  fedbrats measures that against the first prime alone: exact for the
two-prime chains it uses (the first prime *is* the ciphertext modulus), conservative for longer
chains (a ciphertext keeps only the first prime after a modulus switch to the last level).  See
:func:`check_params` for the bounds, each reported as required vs available.

Releasing decrypted values.  Li and Micciancio ("On the Security of Homomorphic Encryption on
Approximate Numbers", EUROCRYPT 2021) show that the exact CKKS decryption ``m + e`` of a known
ciphertext ``(c0, c1)`` gives the linear equation ``c0 + c1 * s = m + e`` and, from it, the secret
key ``s``.  The aggregator holds the aggregate ciphertext and all sites share ``s``, so a
decrypted value (the new global model, a checkpoint, anything computed from them) must never go
back to the aggregator -- or anyone who can see ciphertexts -- exactly: pass it through
:func:`noise_flood` (Gaussian noise from the operating system's CSPRNG, far above the decryption
error :func:`decryption_error_bound`; Li, Micciancio, Schultz, Sorrell, "Securing Approximate
Homomorphic Encryption Using Differential Privacy", CRYPTO 2022) and then
:func:`round_for_release`.  Rounding alone is a heuristic (a value near a rounding boundary still
leaks), which is why flooding comes first.

Wire formats (changing any of them is a protocol version bump):

* context files: ``b"FBCKKSP1"`` + params + a random 32-byte context id + TenSEAL's public
  context (parameters only); the secret file is ``b"FBCKKSS1"`` + the public file + TenSEAL's
  secret context.  The fingerprint is SHA-256 of the public file, so it is the same at the sites
  and at the aggregator, and the random id makes it differ between two federations that use the
  same parameters (TenSEAL's public context alone is 89 bytes of parameters).
* each ciphertext chunk: ``b"FBC1"`` + the fingerprint (32 bytes) + chunk index and chunk count
  (uint32 big-endian) + one serialized TenSEAL ``CKKSVector`` holding one ciphertext.  The
  fingerprint in the header is how :class:`EncryptedSum` and :func:`decrypt_aggregate` refuse a
  chunk made under another federation's context; it is metadata, not a cryptographic binding (a
  site that lies about it can send garbage anyway; it is authenticated by mTLS, not by this).

Parallelism: TenSEAL 0.3.18's bindings hold the GIL during encryption (no ``gil_scoped_release``
in ``binding.cpp``), so threads do not help (measured: none).  Large updates are encrypted and
decrypted by worker processes -- fresh interpreters that import only this module (not forked:
the daemons run gRPC and torch threads), each given the secret context on its stdin pipe.

Nothing in this module logs or puts into an error message a key, a plaintext value or a weight.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import numbers
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crypto.errors import CryptoError, CryptoInputError
from fedbrats.errors import ConfigError, FedbratsError

__all__ = [
    "ALLOWED_DEGREES",
    "CHUNK_HEADER_BYTES",
    "DEFAULT_PARAMS",
    "MAX_COEFF_BITS",
    "LIMIT_SLACK",
    "MIN_CHUNKS_PER_WORKER",
    "MIN_POOL_CHUNKS",
    "MIN_POOL_CORES",
    "CKKSContext",
    "CKKSParams",
    "EncryptedSum",
    "FederationContext",
    "check_params",
    "chunk_count",
    "decrypt_aggregate",
    "decryption_error_bound",
    "encrypt_update",
    "load_context",
    "make_context",
    "noise_flood",
    "payload_size",
    "round_for_release",
    "value_limit",
]

log = logging.getLogger(__name__)

#: Ring dimensions fedbrats accepts.
ALLOWED_DEGREES = (4096, 8192, 16384, 32768)
#: Largest total coefficient-modulus size for 128-bit security (HomomorphicEncryption.org
#: standard, ternary secret; the values SEAL enforces with ``sec_level_type::tc128``).
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: Bit sizes SEAL accepts for one prime (``SEAL_USER_MOD_BIT_COUNT_MAX`` is 60; below 20 bits
#: there are too few primes congruent to 1 modulo 2N).
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60

#: Variance, in units of the last bit of the scaled plaintext, of one coefficient of the error
#: of a fresh *symmetric* encryption: SEAL's noise (standard deviation 3.2; 10.5 is the variance
#: of its centred binomial sampler, the larger of its two samplers) plus the encoder's rounding
#: of each coefficient to an integer (uniform, variance 1/12).
FRESH_NOISE_VARIANCE = 10.5 + 1.0 / 12.0
#: Tail factor of the precision bound: a Gaussian exceeds 8 standard deviations with probability
#: 1.2e-15, so fewer than one value in a million rounds of 1e9 values does.
NOISE_TAIL_SIGMAS = 8.0
#: Largest absolute error of the decrypted FedAvg mean that :func:`check_params` accepts by
#: default (a tenth of the 1e-4 acceptance threshold of case K06).
DEFAULT_TOLERANCE = 1e-5
#: Bits between the largest scaled value and the first prime: one sign bit, and one guard bit for
#: the decryption error and for a b-bit prime lying anywhere in [2^(b-1), 2^b).
SIGN_BITS, GUARD_BITS = 1, 1

#: Relative slack of the value limit in :func:`encrypt_update`, so that rounding in ``w * delta``
#: (float32 included) never refuses a ``delta`` clipped to exactly ``max_abs_value``; the guard
#: bit of the headroom check covers far more.
LIMIT_SLACK = 1e-6

_SOURCE = "CKKS parameters"
_PUBLIC_MAGIC = b"FBCKKSP1"
_SECRET_MAGIC = b"FBCKKSS1"
_CHUNK_MAGIC = b"FBC1"
_CONTEXT_ID_BYTES = 32
_FINGERPRINT_BYTES = 32
_CHUNK_HEAD = struct.Struct(">4s32sII")
#: Bytes of fedbrats framing in front of every serialized ciphertext.
CHUNK_HEADER_BYTES = _CHUNK_HEAD.size
#: ``workers=0`` starts worker processes only with at least :data:`MIN_POOL_CORES` available
#: cores and at least :data:`MIN_POOL_CHUNKS` chunks (2.1M parameters at N = 8192), and gives
#: each worker at least :data:`MIN_CHUNKS_PER_WORKER` chunks.  Measured: a worker takes 0.4-0.5 s
#: to start (interpreter, TenSEAL import, context load) and 20 % more CPU in all than this
#: process alone (pipes, pickling); a chunk takes 1.8 ms to encrypt.  On 2 cores that gains 20 %
#: at best, and loses when the machine is busy; from 3 cores on it pays.
MIN_POOL_CORES = 3
MIN_POOL_CHUNKS = 512
MIN_CHUNKS_PER_WORKER = 64


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters shared by every site and the aggregator.

    Attributes:
        poly_modulus_degree: ring dimension N (4096, 8192, 16384 or 32768); a ciphertext packs
            ``N/2`` values.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes, first to last.  The
            last is SEAL's special (key-switching) prime and never appears in a ciphertext; the
            first is the ciphertext modulus fedbrats measures headroom against.
        scale_bits: log2 of the encoding scale.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        """Values per ciphertext, ``N/2``."""
        return int(self.poly_modulus_degree) // 2


#: fedbrats' default: 32.0 bytes per parameter on the wire, 18 bits of integer headroom above
#: the scale, decryption error about 1e-9 per value and site.  See ``benchmarks/RESULTS.md``.
DEFAULT_PARAMS = CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40), scale_bits=40)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _structural_problems(params: object) -> list[str]:
    """Problems with the parameter set itself, whatever the federation."""
    if not isinstance(params, CKKSParams):
        return [f"expected CKKSParams, got {type(params).__name__}"]
    problems = []
    n = params.poly_modulus_degree
    if not _is_int(n) or n not in ALLOWED_DEGREES:
        problems.append(f"poly_modulus_degree must be one of {', '.join(map(str, ALLOWED_DEGREES))}, got {n!r}")
        n = None
    bits = params.coeff_mod_bit_sizes
    if not isinstance(bits, (tuple, list)) or not all(_is_int(b) for b in bits):
        problems.append(f"coeff_mod_bit_sizes must be a sequence of integers, got {bits!r}")
        bits = None
    else:
        if len(bits) < 2:
            problems.append(
                f"coeff_mod_bit_sizes needs at least 2 primes (the ciphertext prime and SEAL's special prime), "
                f"got {len(bits)}"
            )
        bad = [b for b in bits if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS]
        if bad:
            problems.append(
                f"coeff_mod_bit_sizes: every prime needs {MIN_PRIME_BITS} to {MAX_PRIME_BITS} bits, got {list(bad)}"
            )
        if n is not None and sum(bits) > MAX_COEFF_BITS[n]:
            problems.append(
                f"coeff_mod_bit_sizes: {sum(bits)} bits in total, but 128-bit security at N={n} allows at most "
                f"{MAX_COEFF_BITS[n]} bits"
            )
    scale = params.scale_bits
    if not _is_int(scale) or not 1 <= scale <= MAX_PRIME_BITS:
        problems.append(f"scale_bits must be an integer in [1, {MAX_PRIME_BITS}], got {scale!r}")
    elif bits and _is_int(bits[0]) and scale >= bits[0]:
        problems.append(f"scale_bits ({scale}) must be smaller than the first prime ({bits[0]} bits)")
    return problems


def _noise_units(n_sites: int, poly_modulus_degree: int) -> float:
    """High-probability bound on the error of a sum of ``n_sites`` fresh ciphertexts, in units of
    the scaled plaintext's last bit.

    Each slot's (real) error is a sum over the N coefficient errors times cosines: variance
    ``(N/2) * FRESH_NOISE_VARIANCE`` per fresh ciphertext; independent across sites.
    """
    return NOISE_TAIL_SIGMAS * math.sqrt(n_sites * (poly_modulus_degree / 2) * FRESH_NOISE_VARIANCE)


def decryption_error_bound(params: CKKSParams, sites: int) -> float:
    """Bound on ``|decrypted - exact|`` per value of a sum of ``sites`` fresh ciphertexts.

    ``8 * sqrt(sites * N/2 * 10.58) / 2^scale_bits`` (see :data:`FRESH_NOISE_VARIANCE`,
    :data:`NOISE_TAIL_SIGMAS`).  At the default parameters and 10 sites: 4.8e-9.
    """
    problems = _structural_problems(params)
    if not _is_int(sites) or sites < 1:
        problems.append(f"sites must be an integer >= 1, got {sites!r}")
    if problems:
        raise ConfigError(_SOURCE, problems)
    return _noise_units(sites, params.poly_modulus_degree) / 2.0**params.scale_bits


def value_limit(params: CKKSParams) -> float:
    """Largest ``|value|`` one ciphertext can hold at all: ``2^(first prime - scale - 2)``.

    Sums of several sites need more room; :func:`check_params` checks that.
    """
    problems = _structural_problems(params)
    if problems:
        raise ConfigError(_SOURCE, problems)
    return 2.0 ** (params.coeff_mod_bit_sizes[0] - params.scale_bits - SIGN_BITS - GUARD_BITS)


def check_params(
    params: CKKSParams,
    *,
    max_sites: int,
    max_abs_value: float,
    max_weight: int,
    min_total_weight: float = 1.0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """Check a parameter set at provisioning; raise one ConfigError listing every problem.

    Structure: N is one of :data:`ALLOWED_DEGREES`; at least two primes of 20 to 60 bits; their
    total within the 128-bit-security bound for N (:data:`MAX_COEFF_BITS`: 109, 218, 438, 881
    bits); ``scale_bits`` below the first prime.

    Headroom: each site sends ``w * delta`` with ``|delta| <= max_abs_value`` and its weight
    ``1 <= w <= max_weight`` in the last slot, so after ``max_sites`` additions every slot is
    bounded by ``B = max_sites * max_weight * max(max_abs_value, 1)`` and every plaintext
    coefficient by ``B * 2^scale`` (a coefficient is an average of N slot values times unit
    roots).  Required::

        scale_bits + ceil(log2 B) + 1 sign bit + 1 guard bit  <=  bits of the first prime

    (see the module docstring for why the first prime alone).

    Precision: a sum of ``max_sites`` fresh symmetric encryptions is off by at most
    ``e = 8 * sqrt(max_sites * N/2 * 10.58) / 2^scale`` per slot (:func:`decryption_error_bound`:
    8 standard deviations of a Gaussian; measured at N = 8192, one site: 208.6 units against
    208.2 modelled, kurtosis 3.0), on ``S = sum w x`` and on ``W = sum w`` alike, so the site's
    mean ``S/W`` is off by at most ``e * (1 + max_abs_value) / W`` (first order;
    ``|S/W| <= max_abs_value``).  Required, with ``W >= min_total_weight``::

        e * (1 + max_abs_value) / min_total_weight  <=  tolerance  (default 1e-5 absolute)

    Args:
        params: the parameter set.
        max_sites: most sites summed in one round.
        max_abs_value: largest ``|delta|`` coordinate of an update *before* weighting.
        max_weight: largest FedAvg weight of one site (e.g. its training cases).
        min_total_weight: smallest total weight of a round (1 with integer weights).
        tolerance: largest acceptable absolute error of the decrypted FedAvg mean.

    Raises:
        ConfigError: every problem, each stating what is required and what is available.
    """
    problems = _structural_problems(params)
    workload_ok = True
    if not _is_int(max_sites) or max_sites < 1:
        problems.append(f"max_sites must be an integer >= 1, got {max_sites!r}")
        workload_ok = False
    if not _is_real(max_abs_value) or not (math.isfinite(max_abs_value) and max_abs_value > 0):
        problems.append(f"max_abs_value must be a finite number > 0, got {max_abs_value!r}")
        workload_ok = False
    if not _is_int(max_weight) or max_weight < 1:
        problems.append(f"max_weight must be an integer >= 1, got {max_weight!r}")
        workload_ok = False
    if not _is_real(min_total_weight) or not (math.isfinite(min_total_weight) and min_total_weight > 0):
        problems.append(f"min_total_weight must be a finite number > 0, got {min_total_weight!r}")
        workload_ok = False
    if not _is_real(tolerance) or not (math.isfinite(tolerance) and tolerance > 0):
        problems.append(f"tolerance must be a finite number > 0, got {tolerance!r}")
        workload_ok = False
    if workload_ok and not problems:
        first, scale = params.coeff_mod_bit_sizes[0], params.scale_bits
        bound = max_sites * max_weight * max(float(max_abs_value), 1.0)
        int_bits = max(0, math.ceil(math.log2(bound)))
        needed = scale + int_bits + SIGN_BITS + GUARD_BITS
        if needed > first:
            problems.append(
                f"headroom: the sum of {max_sites} sites' values up to {max_abs_value:g} x weight {max_weight} "
                f"(and their weights) reaches |{bound:g}|, which needs {int_bits} integer bits + {SIGN_BITS} sign bit "
                f"+ {GUARD_BITS} guard bit above the 2^{scale} scale = {needed} bits, but the first prime has {first} "
                f"bits: {first - scale} bits of headroom available above the scale, {needed - scale} required"
            )
        noise = _noise_units(max_sites, params.poly_modulus_degree)
        needed_scale = math.ceil(math.log2(noise * (1.0 + max_abs_value) / (min_total_weight * tolerance)))
        if needed_scale > scale:
            err = noise / 2.0**scale * (1.0 + max_abs_value) / min_total_weight
            problems.append(
                f"precision: {max_sites} sites at N={params.poly_modulus_degree} and scale 2^{scale} can be off by "
                f"{err:.2g} on the FedAvg mean (total weight >= {min_total_weight:g}, |mean| <= {max_abs_value:g}); "
                f"a tolerance of {tolerance:g} requires scale_bits >= {needed_scale}, available {scale}"
            )
    if problems:
        raise ConfigError(_SOURCE, problems)


def chunk_count(num_params: int, params: CKKSParams) -> int:
    """Ciphertexts per update: ``ceil((num_params + 1) / (N/2))`` (the +1 is the weight)."""
    if not _is_int(num_params) or num_params < 1:
        raise CryptoInputError(f"num_params must be an integer >= 1, got {num_params!r}")
    problems = _structural_problems(params)
    if problems:
        raise ConfigError(_SOURCE, problems)
    return -(-(num_params + 1) // params.slots)


# ---------------------------------------------------------------------------------------------
# Contexts


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise FedbratsError("CKKS aggregation needs TenSEAL (pip install tenseal)") from exc
    return tenseal


def _ts_public_bytes(ts_ctx: Any) -> bytes:
    return ts_ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def _encode_params(params: CKKSParams) -> bytes:
    bits = params.coeff_mod_bit_sizes
    return struct.pack(">IBB", params.poly_modulus_degree, params.scale_bits, len(bits)) + bytes(bits)


@dataclass(frozen=True)
class FederationContext:
    """What provisioning writes: the site kits' secret context and the aggregator's public one.

    Attributes:
        secret: secret context file (holds the secret key; site kits only, mode 0600).
        public: public context file (parameters and context id only; aggregator kit).
        fingerprint: SHA-256 (hex) of ``public``; :attr:`CKKSContext.fingerprint` of both.
    """

    secret: bytes = field(repr=False)
    public: bytes = field(repr=False)
    fingerprint: str


def make_context(params: CKKSParams) -> FederationContext:
    """Make a federation's CKKS context: a fresh secret key (symmetric encryption) and a public
    context with the parameters only.

    Call :func:`check_params` first; this checks only the structure of ``params``.

    Raises:
        ConfigError: the parameter set is invalid or SEAL cannot build it.
    """
    problems = _structural_problems(params)
    if problems:
        raise ConfigError(_SOURCE, problems)
    ts = _tenseal()
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=1,
        )
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(_SOURCE, [f"SEAL cannot build these parameters: {exc}"]) from None
    ctx.global_scale = 2.0**params.scale_bits
    public = _PUBLIC_MAGIC + _encode_params(params) + os.urandom(_CONTEXT_ID_BYTES) + _ts_public_bytes(ctx)
    ts_secret = ctx.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    secret = _SECRET_MAGIC + struct.pack(">I", len(public)) + public + ts_secret
    return FederationContext(secret=secret, public=public, fingerprint=hashlib.sha256(public).hexdigest())


class CKKSContext:
    """A loaded context (from :func:`load_context`): parameters, fingerprint, and -- at the sites
    only -- the secret key.  Its ``repr`` shows no key material."""

    __slots__ = ("params", "fingerprint", "is_secret", "_ts", "_ts_secret", "_first_parms_id", "_lock")

    def __init__(self, params: CKKSParams, fingerprint: str, ts_ctx: Any, ts_secret: bytes | None) -> None:
        self.params = params
        self.fingerprint = fingerprint
        self.is_secret = ts_secret is not None
        self._ts = ts_ctx
        self._ts_secret = ts_secret
        self._first_parms_id = list(ts_ctx.seal_context().data.first_context_data().parms_id())
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kind = "secret" if self.is_secret else "public"
        return f"CKKSContext({kind}, {self.params}, fingerprint={self.fingerprint[:16]}...)"

    @property
    def fingerprint_bytes(self) -> bytes:
        return bytes.fromhex(self.fingerprint)


def _bad_context(reason: str) -> CryptoInputError:
    return CryptoInputError(f"not a fedbrats CKKS context: {reason}")


def _parse_public(data: bytes) -> tuple[CKKSParams, bytes]:
    """(params, TenSEAL public context bytes) of a public context file."""
    head = len(_PUBLIC_MAGIC) + 6
    if len(data) < head or data[: len(_PUBLIC_MAGIC)] != _PUBLIC_MAGIC:
        raise _bad_context("bad header")
    n, scale_bits, k = struct.unpack(">IBB", data[len(_PUBLIC_MAGIC) : head])
    end = head + k + _CONTEXT_ID_BYTES
    if len(data) <= end:
        raise _bad_context("truncated")
    params = CKKSParams(n, tuple(data[head : head + k]), scale_bits)
    if _structural_problems(params):
        raise _bad_context("invalid parameters")
    return params, data[end:]


def _check_ts_params(ts_ctx: Any, params: CKKSParams) -> None:
    """The TenSEAL context really has ``params`` (N, chain length, total bits, scale)."""
    sc = ts_ctx.seal_context().data
    key, first = sc.key_context_data(), sc.first_context_data()
    bits = params.coeff_mod_bit_sizes
    k = len(bits)

    def close(total: int, expected: list[int]) -> bool:
        return sum(expected) - (len(expected) - 1) <= total <= sum(expected)

    ok = (
        key.parms().poly_modulus_degree() == params.poly_modulus_degree
        and key.chain_index() == k - 1
        and close(key.total_coeff_modulus_bit_count(), list(bits))
        and close(first.total_coeff_modulus_bit_count(), list(bits[:-1]))
        and ts_ctx.global_scale == 2.0**params.scale_bits
    )
    if not ok:
        raise _bad_context("the TenSEAL context does not match the declared parameters")


def load_context(data: bytes, *, expect_secret: bool) -> CKKSContext:
    """Load a context file written from :func:`make_context`.

    Args:
        data: :attr:`FederationContext.secret` (sites) or :attr:`FederationContext.public`
            (aggregator).
        expect_secret: True at a site (the file must hold the secret key), False at the
            aggregator (it must hold no secret key, and no Galois or relinearisation keys).

    Raises:
        CryptoInputError: (a :class:`~fedbrats.errors.FedbratsError`) the file is malformed, is
            the wrong kind, or holds keys it must not hold.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CryptoInputError(f"context must be bytes, got {type(data).__name__}")
    data = bytes(data)
    ts = _tenseal()
    if data.startswith(_SECRET_MAGIC):
        if not expect_secret:
            raise CryptoInputError("refusing a secret CKKS context where a public one is expected (aggregator side)")
        head = len(_SECRET_MAGIC) + 4
        if len(data) < head:
            raise _bad_context("truncated")
        (plen,) = struct.unpack(">I", data[len(_SECRET_MAGIC) : head])
        public, ts_bytes = data[head : head + plen], data[head + plen :]
        if len(public) != plen or not ts_bytes:
            raise _bad_context("truncated")
    elif data.startswith(_PUBLIC_MAGIC):
        if expect_secret:
            raise CryptoInputError("this CKKS context holds no secret key; a site needs the secret context")
        public, ts_bytes = data, None
    else:
        raise _bad_context("bad header")
    params, ts_public = _parse_public(public)
    try:
        ts_ctx = ts.context_from(ts_bytes if ts_bytes is not None else ts_public, n_threads=1)
    except (ValueError, RuntimeError, TypeError):
        raise _bad_context("TenSEAL cannot parse it") from None
    if ts_bytes is None:
        if ts_ctx.has_secret_key() or ts_ctx.is_private():
            raise CryptoInputError("refusing a public CKKS context that holds a secret key")
        if ts_ctx.has_galois_keys() or ts_ctx.has_relin_keys():
            raise CryptoInputError(
                "refusing a public CKKS context with Galois or relinearisation keys (addition needs none)"
            )
    elif not ts_ctx.has_secret_key():
        raise CryptoInputError("this CKKS context holds no secret key; a site needs the secret context")
    _check_ts_params(ts_ctx, params)
    if ts_bytes is not None and _ts_public_bytes(ts_ctx) != ts_public:
        raise _bad_context("the secret and public parts do not match")
    return CKKSContext(params, hashlib.sha256(public).hexdigest(), ts_ctx, ts_bytes)


def _require_context(ctx: object, *, secret: bool | None, what: str) -> CKKSContext:
    if not isinstance(ctx, CKKSContext):
        raise CryptoInputError(f"{what} needs a CKKSContext from load_context, got {type(ctx).__name__}")
    if secret is True and not ctx.is_secret:
        raise CryptoInputError(f"{what} needs the secret context (sites only)")
    if secret is False and ctx.is_secret:
        raise CryptoInputError(f"{what} takes the public context: the aggregator must not hold the secret key")
    return ctx


# ---------------------------------------------------------------------------------------------
# Chunk framing and ciphertext checks


def _frame(fingerprint: bytes, index: int, count: int, body: bytes) -> bytes:
    return _CHUNK_HEAD.pack(_CHUNK_MAGIC, fingerprint, index, count) + body


def _unframe(chunks: object, ctx: CKKSContext, count: int | None) -> list[memoryview]:
    """Check headers (magic, fingerprint, index, count); return the TenSEAL bodies."""
    if isinstance(chunks, (bytes, bytearray, str)) or not isinstance(chunks, Iterable):
        raise CryptoInputError("chunks must be a list of bytes")
    chunks = list(chunks)
    if not chunks:
        raise CryptoInputError("no chunks")
    if count is not None and len(chunks) != count:
        raise CryptoInputError(f"expected {count} chunks, got {len(chunks)}")
    fp = ctx.fingerprint_bytes
    bodies = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise CryptoInputError(f"chunk {i} is {type(chunk).__name__}, not bytes")
        view = memoryview(chunk)
        if len(view) <= CHUNK_HEADER_BYTES:
            raise CryptoInputError(f"chunk {i} is truncated")
        magic, fingerprint, index, total = _CHUNK_HEAD.unpack(view[:CHUNK_HEADER_BYTES])
        if magic != _CHUNK_MAGIC:
            raise CryptoInputError(f"chunk {i} is not a fedbrats CKKS chunk")
        if fingerprint != fp:
            raise CryptoInputError(
                f"chunk {i} was encrypted under context {fingerprint.hex()[:16]}..., "
                f"not this federation's {ctx.fingerprint[:16]}...; refusing it"
            )
        if index != i or total != len(chunks):
            raise CryptoInputError(f"chunk {i} says it is chunk {index} of {total}, but {len(chunks)} arrived")
        bodies.append(view[CHUNK_HEADER_BYTES:])
    return bodies


def _expected_sizes(total_values: int, slots: int) -> list[int]:
    count = -(-total_values // slots)
    return [slots] * (count - 1) + [total_values - slots * (count - 1)]


def _load_vector(ts: Any, ts_ctx: Any, body: Any, size: int | None, first_parms_id: list[int], scale: float) -> Any:
    """Deserialise one chunk and check it is one fresh-level ciphertext of the right shape.

    Returns None if it is not (the caller raises with the chunk index)."""
    try:
        vec = ts.ckks_vector_from(ts_ctx, bytes(body))
        cts = vec.data.ciphertext()
    except (ValueError, RuntimeError, TypeError):
        return None
    if len(cts) != 1 or (size is not None and vec.size() != size):
        return None
    ct = cts[0]
    if ct.size() != 2 or list(ct.parms_id()) != first_parms_id or ct.scale != scale or ct.is_transparent():
        return None
    return vec


# ---------------------------------------------------------------------------------------------
# Worker processes
#
# Workers are fresh interpreters started with ``python -c`` that import this module only: not
# forked (the daemons run gRPC and torch threads) and not multiprocessing's "spawn", which would
# re-import the caller's ``__main__`` (the whole daemon) in every worker.  The secret context
# reaches a worker through its stdin pipe, never its command line or environment; requests and
# replies are pickles on the worker's own pipes (parent and child are the same program).

_WORKER_BOOT = "import crypto.ckks as m; m._worker_main()"


def _encrypt_block(ts_ctx: Any, block: np.ndarray, slots: int) -> list[bytes]:
    ts = _tenseal()
    return [ts.ckks_vector(ts_ctx, block[i : i + slots]).serialize() for i in range(0, len(block), slots)]


def _decrypt_block(
    ts_ctx: Any, bodies: Sequence[Any], sizes: Sequence[int], first_parms_id: list[int], scale: float
) -> tuple[int, np.ndarray | None]:
    """Decrypt chunks; ``(-1, values)``, or ``(i, None)`` when chunk ``i`` of the block is not
    a valid ciphertext, or ``(-2, None)`` when TenSEAL refuses to decrypt."""
    ts = _tenseal()
    out = []
    for i, (body, size) in enumerate(zip(bodies, sizes)):
        vec = _load_vector(ts, ts_ctx, body, size, first_parms_id, scale)
        if vec is None:
            return i, None
        try:
            out.append(np.asarray(vec.decrypt(), dtype=np.float64))
        except (ValueError, RuntimeError, TypeError):
            return -2, None
    return -1, np.concatenate(out)


def _worker_main() -> None:  # pragma: no cover - runs in the worker processes
    """A worker's loop: read the secret context, then ("enc" | "dec", args) requests until EOF."""
    import pickle
    import sys

    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")  # the protocol stream; anything printed goes to stderr
    os.dup2(2, 1)
    ts_ctx = _tenseal().context_from(pickle.load(stdin), n_threads=1)
    while True:
        try:
            op, args = pickle.load(stdin)
        except EOFError:
            return
        try:
            result = ("ok", _encrypt_block(ts_ctx, *args) if op == "enc" else _decrypt_block(ts_ctx, *args))
        except Exception as exc:  # reported to the parent, which falls back to this process
            result = ("error", type(exc).__name__)
        pickle.dump(result, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


def _run_workers(ctx: CKKSContext, op: str, tasks: list[tuple]) -> list[Any] | None:
    """Run one task per worker process (``len(tasks)`` workers); None if that fails."""
    import pickle
    import subprocess
    import sys

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    procs: list[subprocess.Popen] = []
    try:
        for _ in tasks:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER_BOOT],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
            )
        for proc, task in zip(procs, tasks):
            pickle.dump(ctx._ts_secret, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.dump((op, task), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.close()
        results = []
        for proc in procs:
            status, value = pickle.load(proc.stdout)
            if status != "ok":
                raise RuntimeError(value)
            results.append(value)
        return results
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        log.warning("CKKS worker processes failed (%s); continuing in this process", type(exc).__name__)
        return None
    finally:
        for proc in procs:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _resolve_workers(workers: object, chunks: int) -> int:
    if not _is_int(workers) or workers < 0:
        raise CryptoInputError(f"workers must be an integer >= 0 (0 = automatic), got {workers!r}")
    if workers == 0:
        cores = _available_cores()
        if chunks < MIN_POOL_CHUNKS or cores < MIN_POOL_CORES:
            return 1
        workers = min(cores, chunks // MIN_CHUNKS_PER_WORKER)
    return max(1, min(int(workers), chunks))


def _blocks(count: int, workers: int) -> list[tuple[int, int]]:
    """Split ``count`` chunks into ``workers`` contiguous (start, stop) ranges of equal size."""
    edges = [count * k // workers for k in range(workers + 1)]
    return [(edges[k], edges[k + 1]) for k in range(workers)]


# ---------------------------------------------------------------------------------------------
# Sites: encrypt and decrypt


def encrypt_update(
    x: np.ndarray,
    weight: float,
    ctx: CKKSContext,
    *,
    max_abs_value: float | None = None,
    workers: int = 0,
) -> list[bytes]:
    """Encrypt a site's weighted update and its weight into framed ciphertext chunks.

    Args:
        x: the update already multiplied by the weight, ``w * delta``: a 1-D floating array.
        weight: the site's FedAvg weight ``w > 0``; encrypted in the last slot of the last chunk.
        ctx: the secret context.
        max_abs_value: the ``|delta|`` bound of :func:`check_params`: values with
            ``|x_i| > max_abs_value * weight`` (times ``1 +`` :data:`LIMIT_SLACK`) are refused.
            None refuses only what cannot be encoded at all (``|x_i|`` or ``weight`` above
            :func:`value_limit`).
        workers: processes to encrypt with; 1 = this process; 0 = automatic: this process
            below :data:`MIN_POOL_CHUNKS` chunks or :data:`MIN_POOL_CORES` available cores, else
            one worker per available core (at least :data:`MIN_CHUNKS_PER_WORKER` chunks each).
            If the workers fail, this process does the work (with a warning in the log).

    Returns:
        :func:`chunk_count` framed chunks, in order; :func:`payload_size` bytes in all.

    Raises:
        CryptoInputError: non-finite values (their count is given), values or weight out of
            range, a public context, or a malformed argument.  Nothing is encrypted then.
    """
    ctx = _require_context(ctx, secret=True, what="encrypt_update")
    if not isinstance(x, np.ndarray):
        raise CryptoInputError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        raise CryptoInputError(f"x must be a non-empty 1-D floating array, got shape {x.shape} dtype {x.dtype}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - np.count_nonzero(finite))
        raise CryptoInputError(f"refusing to encrypt: {bad} of {x.size} values are not finite (NaN or Inf)")
    hard = value_limit(ctx.params)
    if not _is_real(weight) or not (math.isfinite(weight) and 0 < weight <= hard):
        raise CryptoInputError(f"weight must be a finite number in (0, {hard:g}]")
    limit, why = hard, f"{hard:g} (what the parameters can encode)"
    if max_abs_value is not None:
        if not _is_real(max_abs_value) or not (math.isfinite(max_abs_value) and max_abs_value > 0):
            raise CryptoInputError(f"max_abs_value must be a finite number > 0, got {max_abs_value!r}")
        if max_abs_value * weight < hard:
            limit, why = max_abs_value * weight, f"max_abs_value {max_abs_value:g} x weight"
    over = int(np.count_nonzero(np.abs(x) > limit * (1.0 + LIMIT_SLACK)))
    if over:
        raise CryptoInputError(f"refusing to encrypt: {over} of {x.size} values exceed the limit {why}")

    slots = ctx.params.slots
    data = np.empty(x.size + 1, dtype=np.float64)
    data[:-1] = x
    data[-1] = float(weight)
    count = -(-data.size // slots)
    n_workers = _resolve_workers(workers, count)
    bodies: list[bytes] | None = None
    if n_workers > 1:
        blocks = _blocks(count, n_workers)
        tasks = [(data[a * slots : b * slots], slots) for a, b in blocks]
        results = _run_workers(ctx, "enc", tasks)
        if results is not None:
            bodies = [body for block in results for body in block]
    if bodies is None:
        with ctx._lock:
            bodies = _encrypt_block(ctx._ts, data, slots)
    fp = ctx.fingerprint_bytes
    return [_frame(fp, i, count, body) for i, body in enumerate(bodies)]


def decrypt_aggregate(
    chunks: Sequence[bytes], secret_ctx: CKKSContext, num_params: int, *, workers: int = 0
) -> tuple[np.ndarray, float]:
    """Decrypt the aggregate at a site: ``(sum_i w_i x_i, sum_i w_i)``; the site divides.

    Args:
        chunks: :meth:`EncryptedSum.serialize` output.
        secret_ctx: the secret context.
        num_params: the model size (without the weight slot).
        workers: as in :func:`encrypt_update`.

    Returns:
        ``(weighted_sum, total_weight)``: float64 array of ``num_params`` values and a float.
        Each is off by at most :func:`decryption_error_bound` (for the number of sites summed).

    Raises:
        CryptoInputError: wrong chunk count, order or fingerprint, a malformed chunk, or a
            public context (the aggregator cannot decrypt: its context has no secret key).
        CryptoError: decryption failed or gave an impossible total weight (opaque).
    """
    ctx = _require_context(secret_ctx, secret=True, what="decrypt_aggregate")
    count = chunk_count(num_params, ctx.params)
    bodies = _unframe(chunks, ctx, count)
    sizes = _expected_sizes(num_params + 1, ctx.params.slots)
    scale = 2.0**ctx.params.scale_bits
    n_workers = _resolve_workers(workers, count)
    results: list[tuple[int, np.ndarray | None]] | None = None
    blocks = _blocks(count, n_workers) if n_workers > 1 else [(0, count)]
    if n_workers > 1:
        tasks = [([bytes(b) for b in bodies[a:b]], sizes[a:b], ctx._first_parms_id, scale) for a, b in blocks]
        results = _run_workers(ctx, "dec", tasks)
    if results is None:
        blocks = [(0, count)]
        with ctx._lock:
            results = [_decrypt_block(ctx._ts, bodies, sizes, ctx._first_parms_id, scale)]
    parts = []
    for (start, _), (status, values) in zip(blocks, results):
        if status == -2:
            raise CryptoError()
        if status >= 0 or values is None:
            raise CryptoInputError(f"chunk {start + status} is not a valid ciphertext for this context")
        parts.append(values)
    out = np.concatenate(parts)
    total_weight = float(out[num_params])
    if not (math.isfinite(total_weight) and total_weight > 0) or not np.isfinite(out).all():
        raise CryptoError()
    return out[:num_params].copy(), total_weight


# ---------------------------------------------------------------------------------------------
# Aggregator


class EncryptedSum:
    """The aggregator's running sum of encrypted updates (it can only add).

    Memory is one model's worth of ciphertexts for the sum, plus the chunks of the update being
    added (``add`` checks every chunk of an update before adding any, so a bad update leaves the
    sum unchanged).  Thread-safe.

    Args:
        public_ctx: the public context (a secret one is refused).
        num_params: the model size; fixes the chunk count.  None: the first update fixes it.
        max_sites: most updates to add (the number :func:`check_params` was run with); more
            are refused, since the headroom check no longer covers the sum.
    """

    def __init__(self, public_ctx: CKKSContext, *, num_params: int | None = None, max_sites: int | None = None):
        self._ctx = _require_context(public_ctx, secret=False, what="EncryptedSum")
        self._count = None if num_params is None else chunk_count(num_params, self._ctx.params)
        self._sizes = None if num_params is None else _expected_sizes(num_params + 1, self._ctx.params.slots)
        if max_sites is not None and (not _is_int(max_sites) or max_sites < 1):
            raise CryptoInputError(f"max_sites must be an integer >= 1, got {max_sites!r}")
        self._max_sites = max_sites
        self._acc: list[Any] | None = None
        self._sites = 0
        self._lock = threading.Lock()

    @property
    def sites(self) -> int:
        """Updates added so far."""
        return self._sites

    @property
    def fingerprint(self) -> str:
        return self._ctx.fingerprint

    def add(self, chunks: Sequence[bytes]) -> None:
        """Add one site's update (the output of :func:`encrypt_update`).

        Raises:
            CryptoInputError: wrong chunk count or order, a chunk from another context (its
                fingerprint differs), a chunk that is not a fresh ciphertext of these parameters
                (wrong ring, level, scale or size), or ``max_sites`` reached.  The sum is
                unchanged then.
        """
        ts = _tenseal()
        ctx = self._ctx
        with self._lock:
            if self._max_sites is not None and self._sites >= self._max_sites:
                raise CryptoInputError(f"already {self._sites} updates, the most the parameters were checked for")
            bodies = _unframe(chunks, ctx, self._count)
            scale = 2.0**ctx.params.scale_bits
            vectors = []
            for i, body in enumerate(bodies):
                size = self._sizes[i] if self._sizes else (ctx.params.slots if i < len(bodies) - 1 else None)
                vec = _load_vector(ts, ctx._ts, body, size, ctx._first_parms_id, scale)
                if vec is None:
                    raise CryptoInputError(f"chunk {i} is not a valid ciphertext for this context")
                vectors.append(vec)
            if self._acc is None:
                self._acc = vectors
                self._count = len(vectors)
                self._sizes = [v.size() for v in vectors]
            else:
                for acc, vec in zip(self._acc, vectors):
                    acc.add_(vec)
            self._sites += 1

    def serialize(self) -> list[bytes]:
        """The encrypted aggregate as framed chunks, for the sites' :func:`decrypt_aggregate`."""
        with self._lock:
            if self._acc is None:
                raise CryptoInputError("nothing to serialize: no update was added")
            fp = self._ctx.fingerprint_bytes
            return [_frame(fp, i, len(self._acc), v.serialize()) for i, v in enumerate(self._acc)]


# ---------------------------------------------------------------------------------------------
# Sizes


@functools.lru_cache(maxsize=16)
def _ciphertext_bytes(params: CKKSParams) -> int:
    """Serialized size of one full chunk, measured under a throwaway key (the coefficients of a
    ciphertext are uniform modulo q whatever it encrypts, so every chunk compresses alike)."""
    ts = _tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )
    ctx.global_scale = 2.0**params.scale_bits
    return len(ts.ckks_vector(ctx, np.zeros(params.slots)).serialize())


def payload_size(num_params: int, params: CKKSParams) -> int:
    """Bytes :func:`encrypt_update` will produce for ``num_params`` values (within about 1 %),
    framing included; also the size of the aggregate.  For reporting before sending."""
    count = chunk_count(num_params, params)
    canonical = CKKSParams(
        int(params.poly_modulus_degree), tuple(int(b) for b in params.coeff_mod_bit_sizes), int(params.scale_bits)
    )
    return count * (CHUNK_HEADER_BYTES + _ciphertext_bytes(canonical))


# ---------------------------------------------------------------------------------------------
# Releasing decrypted values (Li and Micciancio, EUROCRYPT 2021)


def noise_flood(x: np.ndarray, *, bits: int) -> np.ndarray:
    """``x`` plus Gaussian noise of standard deviation ``2^-bits`` (float64), drawn from the
    operating system's CSPRNG (Box-Muller on ``os.urandom``), so nobody can predict or remove it.

    Choose ``bits`` so the noise is far above the decryption error yet below what matters for
    the model.  At the default parameters and 10 sites the error has standard deviation 2^-30.6
    (8-sigma bound :func:`decryption_error_bound`: 2^-27.6); ``bits=20`` (sigma 9.5e-7) is about
    2^10 times that.  How wide a margin a given number of released decryptions needs for a given
    security level is quantified by Li, Micciancio, Schultz and Sorrell (CRYPTO 2022).
    """
    if not _is_int(bits) or not 1 <= bits <= 52:
        raise CryptoInputError(f"bits must be an integer in [1, 52], got {bits!r}")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise CryptoInputError("refusing to flood non-finite values")
    n = x.size
    pairs = -(-n // 2)
    u = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((u[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (u[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return x + z.reshape(x.shape) * 2.0**-bits


def round_for_release(values: np.ndarray, decimals: int) -> np.ndarray:
    """Round decrypted (and flooded, :func:`noise_flood`) values to ``decimals`` decimal places
    before they leave the site, so the exact decryption never does."""
    if not _is_int(decimals) or not 0 <= decimals <= 15:
        raise CryptoInputError(f"decimals must be an integer in [0, 15], got {decimals!r}")
    return np.round(np.asarray(values, dtype=np.float64), decimals)
