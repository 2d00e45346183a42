"""The aggregator's side of homomorphic aggregation with CKKS (``ckks`` mode).

The aggregator holds the federation's *public* TenSEAL context (no secret key, no Galois or
relinearisation keys) and can only add: each site's ciphertext chunks are added in place into one
running sum as they arrive (memory O(model), not O(sites × model)), and the round's result is the
encrypted aggregate ``(Σ wᵢΔᵢ, Σ wᵢ)``.  Only the sites can decrypt it; the aggregator never
sees a model after round 1.  See :mod:`crypto.ckks` for packing, parameters and the
Li–Micciancio caveat on releasing decrypted values.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from crypto import ckks
from crypto.errors import CryptoError, CryptoInputError
from fedbrats import wire
from fedbrats.config import Config
from fedbrats.errors import ConfigError, FedbratsError, ProtocolError

#: Tensor name prefix of ciphertext chunks inside a ``ckks`` payload: ``ct.00000``, ...
CHUNK_PREFIX = "ct."


def chunks_to_tensors(chunks: list[bytes]) -> dict[str, np.ndarray]:
    """Ciphertext chunks as named uint8 tensors for the wire codec."""
    return {f"{CHUNK_PREFIX}{i:05d}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(chunks)}


def tensors_to_chunks(tensors: Mapping[str, np.ndarray], what: str) -> list[bytes]:
    """Inverse of :func:`chunks_to_tensors`.

    Raises:
        ProtocolError: a tensor is not a uint8 ciphertext chunk or the numbering has gaps.
    """
    names = sorted(tensors)
    if not names or names != [f"{CHUNK_PREFIX}{i:05d}" for i in range(len(names))]:
        raise ProtocolError(f"{what}: a ckks payload must hold ciphertext chunks "
                            f"{CHUNK_PREFIX}00000.. without gaps")
    out = []
    for n in names:
        t = tensors[n]
        if t.dtype != np.uint8 or t.ndim != 1:
            raise ProtocolError(f"{what}: chunk {n} must be a 1-D uint8 array")
        out.append(t.tobytes())
    return out


def load_federation_context(cfg: Config, *, secret: bool):
    """The TenSEAL context named by ``ckks.context`` (secret at sites, public at the aggregator).

    Raises:
        FedbratsError: the path is unset or unreadable, or the file holds the wrong kind of
            context (a secret key at the aggregator, none at a site).
    """
    path = cfg.ckks.context
    who = "site" if secret else "aggregator"
    if not path:
        raise FedbratsError(f"{who}: secure_aggregation = 'ckks' needs ckks.context (the "
                            f"{'secret' if secret else 'public'} context from `fedbrats "
                            f"provision`)")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"ckks.context: cannot read: {exc.strerror or exc}"]) \
            from None
    if secret:
        from crypto.pki import check_private_mode

        check_private_mode(Path(path), "ckks.context (the shared CKKS secret key)")
    try:
        return ckks.load_context(data, expect_secret=secret)
    except (CryptoError, CryptoInputError, FedbratsError) as exc:
        raise FedbratsError(f"ckks.context: {path}: {exc}") from None


#: Gaussian tail multiple of a site's noise standard deviation added to the value bound
#: (P(|N(0, 1)| > 12) < 4e-33 per coordinate).
NOISE_TAIL_SIGMAS = 12.0


def check_dp_noise_fits(cfg: Config) -> float:
    """Check that updates *after* site-level DP noise still fit the CKKS parameters.

    A site clips each coordinate of Δ to ±``ckks.max_abs_value`` and then adds its noise:
    N(0, σ²C²) for ``site-local``, a share N(0, σ²C²/min_sites) for ``site-distributed``.  The
    bound checked is ``max_abs_value + 12·std`` with weight 1 (site-level DP weights sites
    equally), against the whole sum of ``federation.sites`` sites (:func:`crypto.ckks.check_params`).

    Returns:
        The value bound used (``ckks.max_abs_value`` when no noise is configured).

    Raises:
        ConfigError: the noisy values do not fit; names ``dp.site_noise_multiplier`` and
            ``dp.site_clip`` with the required vs available headroom.
    """
    ck, dp, fed = cfg.ckks, cfg.dp, cfg.federation
    modes = set(dp.mode)
    if "site-local" in modes:
        std = dp.site_noise_multiplier * dp.site_clip
    elif "site-distributed" in modes:
        std = dp.site_noise_multiplier * dp.site_clip / max(1, fed.min_sites) ** 0.5
    else:
        return float(ck.max_abs_value)
    bound = float(ck.max_abs_value) + NOISE_TAIL_SIGMAS * std
    params = ckks.CKKSParams(ck.poly_modulus_degree, tuple(ck.coeff_mod_bit_sizes), ck.scale_bits)
    try:
        ckks.check_params(params, max_sites=fed.sites, max_abs_value=bound, max_weight=1)
    except ConfigError as exc:
        raise ConfigError("dp + ckks", [
            f"dp.site_noise_multiplier = {dp.site_noise_multiplier:g} x dp.site_clip = "
            f"{dp.site_clip:g} puts update values up to +-{bound:.4g} (ckks.max_abs_value "
            f"{ck.max_abs_value:g} + {NOISE_TAIL_SIGMAS:g} noise standard deviations), which the "
            f"CKKS parameters cannot sum over {fed.sites} sites: {p}" for p in exc.problems]) from None
    return bound


class CKKSSum:
    """The :class:`~aggregator.aggregate.SecureSum` of ``ckks`` mode: add, never decrypt."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        check_dp_noise_fits(cfg)
        self.ctx = load_federation_context(cfg, secret=False)
        self._acc: ckks.EncryptedSum | None = None
        self._round = 0
        self._sites: set[str] = set()

    def begin_round(self, round: int, global_model: Mapping[str, np.ndarray] | None) -> None:
        self._round = round
        self._acc = ckks.EncryptedSum(self.ctx, max_sites=self.cfg.federation.sites)
        self._sites = set()

    def add(self, site: str, weight: int, tensors: Mapping[str, np.ndarray]) -> None:
        if self._acc is None:
            raise ProtocolError("no round in progress")
        if site in self._sites:
            raise ProtocolError(f"site {site}: round {self._round}: update already added")
        chunks = tensors_to_chunks(tensors, f"site {site}, round {self._round}")
        try:
            self._acc.add(chunks)
        except (CryptoError, CryptoInputError) as exc:
            from aggregator.aggregate import UpdateRejected

            raise UpdateRejected(f"site {site}, round {self._round}: encrypted update refused "
                                 f"({exc}); is the site using this federation's CKKS context?") \
                from None
        self._sites.add(site)

    def finalize(self, sites: tuple[str, ...]) -> wire.Payload:
        """The encrypted aggregate as a ``ckks`` payload (the sites decrypt and divide)."""
        if self._acc is None or set(sites) != self._sites:
            raise ProtocolError(f"round {self._round}: asked to aggregate {sorted(sites)} but "
                                f"updates were added for {sorted(self._sites)}")
        return wire.pack_tensors(chunks_to_tensors(self._acc.serialize()), scheme="ckks")
