"""The aggregator's side of secure aggregation by pairwise masking (``mask`` mode).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the SecAgg+ neighbour graph of Bell et al. (CCS 2020).  The aggregator only
*routes* and *adds*: it relays signed key advertisements (U1) and encrypted share bundles (U2),
sums the masked inputs modulo 2^bits as they stream in (U3; memory O(model)), collects the
revealed shares (U4) and removes the masks.  It never sees a key, seed or update of any single
site, and it refuses to hold both kinds of share for one site: survivors (U3) may only reveal
shares of their self-mask seed, dropped sites (U2 \\ U3) only shares of their mask key.

The masked vector of a site is ``[q(w·Δ) , w]`` masked: its last coordinate is the site's
FedAvg weight w, so weights travel masked too and the aggregator learns only Σw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from crypto import quantize as quant
from crypto import secagg
from crypto.errors import CryptoError, CryptoInputError
from fedbrats.config import Config, secagg_threshold
from fedbrats.errors import ProtocolError, RoundAborted
from fedbrats.masking import (
    MASK_KEY,
    MASKED_TENSOR,
    SELF_MASK_SEED,
    Advertisement,
    EncryptedShares,
    RevealedShare,
    graph_seed,
    neighbour_graph,
    quant_params,
    skellam_in_sum,
)

_LOGGER = logging.getLogger(__name__)

@dataclass
class MaskedRound:
    """One round of masked aggregation at the aggregator (no gRPC, no clocks).

    Args:
        cfg: federation configuration (threshold, graph, quantisation).
        round: round number.
        model: the global model (name -> array), for shapes and the final update.
    """

    cfg: Config
    round: int
    model: Mapping[str, np.ndarray]
    adverts: dict[str, Advertisement] = field(default_factory=dict)
    shares: dict[str, list[EncryptedShares]] = field(default_factory=dict)
    senders: list[str] = field(default_factory=list)
    masked_sites: list[str] = field(default_factory=list)
    revealed: dict[str, dict[str, dict[int, bytes]]] = field(default_factory=dict)
    responders: list[str] = field(default_factory=list)
    u1: tuple[str, ...] = ()
    u2: tuple[str, ...] = ()
    u3: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        dim = sum(int(np.asarray(v).size) for v in self.model.values())
        # With Skellam noise in the sum the budget (and decoding) include its headroom, which
        # depends on the model dimension: the sites derive it from the same dimension.
        self.params = quant_params(self.cfg, dim=dim)
        self.threshold = secagg_threshold(self.cfg)
        self.count = dim + 1
        self._sum = np.zeros(self.count, dtype=self.params.dtype)

    # -- stage 1: advertise keys ---------------------------------------------------------------

    def add_advertisement(self, adv: Advertisement) -> None:
        """Store a site's signed keys (the sites verify the signatures themselves)."""
        if adv.site in self.adverts:
            raise ProtocolError(f"site {adv.site}: round {self.round}: keys already advertised")
        if len(adv.mask_public) != 32 or len(adv.share_public) != 32 or len(adv.signature) != 64:
            raise ProtocolError(f"site {adv.site}: round {self.round}: malformed key advertisement")
        self.adverts[adv.site] = adv

    def close_advertise(self, u1: tuple[str, ...]) -> None:
        self.u1 = tuple(sorted(u1))

    def keys_for(self, site: str) -> tuple[list[Advertisement], list[str]]:
        """The advertisements of U1 and ``site``'s neighbours (share-keys stage)."""
        if site not in self.u1:
            raise ProtocolError(f"site {site}: round {self.round}: not among the sites that "
                                f"advertised keys")
        graph = neighbour_graph(self.cfg, self.round, self.u1)
        return [self.adverts[s] for s in self.u1], sorted(graph[site])

    # -- stage 2: share keys -------------------------------------------------------------------

    def add_shares(self, sender: str, bundles: list[EncryptedShares]) -> None:
        """Route a site's encrypted share bundles (one per neighbour in U1)."""
        if sender in self.senders:
            raise ProtocolError(f"site {sender}: round {self.round}: shares already sent")
        graph = neighbour_graph(self.cfg, self.round, self.u1)
        expected = set(graph[sender])
        got = [b.recipient for b in bundles]
        if any(b.sender != sender for b in bundles) or set(got) != expected or len(got) != len(expected):
            raise ProtocolError(f"site {sender}: round {self.round}: share bundles must be "
                                f"addressed to exactly its {len(expected)} neighbour(s)")
        for b in bundles:
            self.shares.setdefault(b.recipient, []).append(b)
        self.senders.append(sender)

    def close_share(self, u2: tuple[str, ...]) -> None:
        self.u2 = tuple(sorted(u2))

    def shares_for(self, site: str) -> tuple[list[EncryptedShares], list[str]]:
        """Bundles addressed to ``site`` from U2, and U2 itself (masked-input stage)."""
        if site not in self.u2:
            raise ProtocolError(f"site {site}: round {self.round}: not among the sites that "
                                f"shared keys")
        return [b for b in self.shares.get(site, []) if b.sender in self.u2], list(self.u2)

    # -- stage 3: masked input -----------------------------------------------------------------

    def add_masked(self, site: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Add one masked input to the running modular sum."""
        if site in self.masked_sites:
            raise ProtocolError(f"site {site}: round {self.round}: masked input already added")
        if site not in self.u2:
            raise ProtocolError(f"site {site}: round {self.round}: did not share keys; its "
                                f"masked input cannot be unmasked")
        y = tensors.get(MASKED_TENSOR)
        if set(tensors) != {MASKED_TENSOR} or y is None or y.dtype != self.params.dtype \
                or y.shape != (self.count,):
            raise ProtocolError(f"site {site}: round {self.round}: masked input must be one "
                                f"{self.params.dtype} vector {MASKED_TENSOR!r} of {self.count} "
                                f"values")
        self._sum += y  # wraps modulo 2^bits
        self.masked_sites.append(site)

    def close_masked(self, u3: tuple[str, ...]) -> None:
        self.u3 = tuple(sorted(u3))

    def survivors(self) -> tuple[list[str], list[str]]:
        """(U3, U2 \\ U3) for the unmask stage."""
        return list(self.u3), [s for s in self.u2 if s not in self.u3]

    # -- stage 4: unmask -----------------------------------------------------------------------

    def add_revealed(self, site: str, shares: list[RevealedShare]) -> None:
        """Store a survivor's revealed shares, refusing any share the protocol does not allow.

        Raises:
            ProtocolError: the site is not a survivor, reveals a self-mask-seed share of a
                dropped site or a mask-key share of a survivor, or a share for a site outside
                U2.
        """
        if site not in self.u3:
            raise ProtocolError(f"site {site}: round {self.round}: only survivors reveal shares")
        if site in self.responders:
            raise ProtocolError(f"site {site}: round {self.round}: shares already revealed")
        dropped = set(self.u2) - set(self.u3)
        holder_x = secagg.holder_indices(self.u1)[site]
        staged: list[RevealedShare] = []
        for sh in shares:
            if sh.kind == SELF_MASK_SEED and sh.owner in self.u3:
                pass
            elif sh.kind == MASK_KEY and sh.owner in dropped:
                pass
            else:
                raise ProtocolError(f"site {site}: round {self.round}: refused a {sh.kind} share "
                                    f"of {sh.owner}: the aggregator takes self-mask-seed shares "
                                    f"of survivors and mask-key shares of dropped sites only")
            if sh.x != holder_x:
                raise ProtocolError(f"site {site}: round {self.round}: share evaluation point "
                                    f"{sh.x} is not the site's ({holder_x})")
            staged.append(sh)
        for sh in staged:
            self.revealed.setdefault(sh.owner, {}).setdefault(sh.kind, {})[sh.x] = sh.share
        self.responders.append(site)

    def unmask(self) -> tuple[dict[str, np.ndarray], int]:
        """Remove the masks and decode the weighted mean update.

        Returns:
            ``(mean update Δ̄ by tensor name (float32), total weight Σw)``.

        Raises:
            RoundAborted: too few shares for some site (says how many of how many), or the
                shares do not rebuild consistent secrets; nothing is released.
        """
        t = self.threshold
        seeds: dict[str, bytes] = {}
        for u in self.u3:
            got = self.revealed.get(u, {}).get(SELF_MASK_SEED, {})
            if len(got) < t:
                raise RoundAborted(f"round {self.round}: unmask: {len(got)} of the {t} needed "
                                   f"shares of {u}'s self-mask seed arrived; nothing released")
            try:
                seeds[u] = secagg.recover_self_seed(got, threshold=t)
            except (CryptoError, CryptoInputError):
                raise RoundAborted(f"round {self.round}: unmask: the shares of {u}'s self-mask "
                                   f"seed are inconsistent; nothing released") from None
        graph = neighbour_graph(self.cfg, self.round, self.u1)
        pairs: dict[tuple[str, str], bytes] = {}
        for v in self.u2:
            if v in self.u3:
                continue
            got = self.revealed.get(v, {}).get(MASK_KEY, {})
            if len(got) < t:
                raise RoundAborted(f"round {self.round}: unmask: {len(got)} of the {t} needed "
                                   f"shares of dropped site {v}'s mask key arrived; nothing "
                                   f"released")
            publics = {u: self.adverts[u].mask_public for u in self.u3 if u in graph[v]}
            try:
                pairs.update(secagg.recover_dropped_pairwise(
                    v, got, threshold=t, dropped_public=self.adverts[v].mask_public,
                    survivor_publics=publics))
            except (CryptoError, CryptoInputError):
                raise RoundAborted(f"round {self.round}: unmask: the shares of dropped site "
                                   f"{v}'s mask key are inconsistent; nothing released") from None
        total = secagg.unmask_sum(self._sum, survivors_self_seeds=seeds, dropped_pairwise=pairs,
                                  round=self.round, federation=self.cfg.federation.name,
                                  bits=self.params.modulus_bits)
        weight = int(total[-1])
        if not 1 <= weight <= len(self.u3) * self.params.max_weight:
            raise RoundAborted(f"round {self.round}: unmask: the unmasked total weight {weight} is "
                               f"impossible for {len(self.u3)} site(s); masks did not cancel")
        if skellam_in_sum(self.cfg):
            mean = self._decode_noisy(total[:-1], weight)
        else:
            try:
                mean = quant.dequantize_sum(total[:-1], params=self.params, total_weight=weight)
            except (CryptoError, CryptoInputError) as exc:
                raise RoundAborted(f"round {self.round}: unmask: {exc}") from None
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, ref in self.model.items():
            n = int(np.asarray(ref).size)
            out[name] = mean[offset:offset + n].reshape(np.asarray(ref).shape).astype(np.float32)
            offset += n
        return out, weight


    def _decode_noisy(self, total: np.ndarray, weight: int) -> np.ndarray:
        """Decode a sum that carries distributed Skellam noise (``site-distributed``).

        The noisy total of W = ``weight`` weighted quantised values lies in ``[-B, W·L + B]``,
        B = ``params.noise_headroom`` (:func:`fedbrats.masking.skellam_headroom`, exceeded in
        some coordinate with probability at most 2^-40 per round), and the bit budget keeps
        that interval shorter than the modulus 2^m.  A coordinate near 0 may have wrapped below
        it, so the sum is read in the centred representative — a value at or above 2^m − B is
        negative — then the affine quantisation map is inverted (Agarwal, Kairouz, Liu, "The
        Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

        Raises:
            RoundAborted: some coordinates lie outside ``[-B, W·L + B]`` (masks that did not
                cancel, a misreported weight, a corrupt sum or noise beyond its tail bound); the
                error counts them and nothing is decoded.
        """
        params = self.params
        modulus = 1 << params.modulus_bits
        b = int(params.noise_headroom)
        t = total.astype(np.uint64)
        high = np.uint64(int(weight) * params.levels + b)
        negative = t >= np.uint64(modulus - b) if b else np.zeros(t.shape, dtype=bool)
        bad = int(np.count_nonzero((t > high) & ~negative))
        if bad:
            raise RoundAborted(
                f"round {self.round}: unmask: {bad} of {t.size} coordinates of the noisy sum lie "
                f"outside [-B, W x (2^{params.bits} - 1) + B] (W = {weight}, Skellam noise "
                f"headroom B = {b}): the masks did not cancel, a weight was misreported, or the "
                f"sum is corrupt; nothing released")
        if params.modulus_bits == 64:
            signed = t.view(np.int64)  # two's complement: values >= 2^64 - B become t - 2^64
        else:
            signed = t.astype(np.int64)
            signed[negative] -= np.int64(modulus)
        return signed.astype(np.float64) * params.step / weight - float(params.clip)


class MaskedFedAvg:
    """The :class:`~aggregator.aggregate.SecureSum` face of masked aggregation."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.current: MaskedRound | None = None
        self._global: dict[str, np.ndarray] = {}

    def begin_round(self, round: int, global_model: Mapping[str, np.ndarray]) -> None:
        self._global = dict(global_model)
        self.current = MaskedRound(self.cfg, round, self._global)

    def add(self, site: str, weight: int, tensors: Mapping[str, np.ndarray]) -> None:
        if self.current is None:
            raise ProtocolError("no round in progress")
        self.current.add_masked(site, tensors)

    def finalize(self, sites: tuple[str, ...]) -> dict[str, np.ndarray]:
        if self.current is None:
            raise ProtocolError("no round in progress")
        mean, _ = self.current.unmask()
        return {k: (self._global[k].astype(np.float64) + mean[k]).astype(self._global[k].dtype)
                for k in self._global}
