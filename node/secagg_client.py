"""A site's side of secure aggregation by pairwise masking (``mask`` mode).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the SecAgg+ neighbour graph of Bell et al. (CCS 2020).  One
:class:`MaskingClient` per node; per round it

1. :meth:`advertise`: makes fresh X25519 key pairs (mask key s, share-encryption key c) and
   signs them with the site's provisioned Ed25519 identity key;
2. :meth:`make_shares`: verifies every other site's signed advertisement against the
   provisioned identity public keys, checks the neighbour graph and threshold the aggregator
   announces, draws a fresh self-mask seed b, Shamir-shares b and s_SK t-of-|N|+1 among its
   neighbours and itself, and encrypts each neighbour's bundle (AES-GCM);
3. :meth:`receive_shares`: decrypts the bundles addressed to it;
4. :meth:`mask`: quantises its weighted update, appends its weight, and masks it;
5. :meth:`reveal`: given the survivors, reveals self-mask-seed shares of survivors and mask-key
   shares of dropped sites — never both for one site — and forgets the round's secrets.

Stages must come in this order; anything else is refused.  Nothing here logs or returns a key,
seed or share except inside the protocol messages themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
from crypto import primitives, quantize, secagg
from crypto.errors import CryptoError, CryptoInputError
from fedbrats.config import Config, secagg_threshold
from fedbrats.errors import FedbratsError, ProtocolError


class SecAggRefused(ProtocolError):
    """The node refuses a secure-aggregation step (bad signature, graph, order or survivors)."""


def load_identities(folder: str | Path) -> dict[str, bytes]:
    """Every site's raw Ed25519 identity public key from ``folder/<site>.pub`` (provisioning).

    Raises:
        FedbratsError: the folder is missing or a key file is not an Ed25519 public key (names
            the file).
    """
    d = Path(folder)
    if not d.is_dir():
        raise FedbratsError(f"node.identities_dir: {d} is not a directory (it holds every "
                            f"site's identity public key, from `fedbrats provision`)")
    out = {}
    for p in sorted(d.glob("*.pub")):
        try:
            out[p.stem] = primitives.ed25519_public_raw_from_pem(p.read_bytes())
        except (CryptoInputError, OSError):
            raise FedbratsError(f"node.identities_dir: {p} is not an Ed25519 public key") from None
    if not out:
        raise FedbratsError(f"node.identities_dir: {d} holds no <site>.pub identity keys")
    return out


def load_identity_key(path: str | Path) -> bytes:
    """The site's raw Ed25519 identity private key from a PEM file.

    Raises:
        FedbratsError: unreadable or not an Ed25519 private key (names the file).
    """
    from crypto.pki import check_private_mode

    p = Path(path)
    if p.exists():
        check_private_mode(p, "node.identity_key")
    try:
        return primitives.ed25519_private_raw_from_pem(p.read_bytes())
    except (CryptoInputError, OSError):
        raise FedbratsError(f"node.identity_key: {p} is not a readable Ed25519 private key") \
            from None


def flatten_with_weight_slot(delta: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """``(flat, P)``: the update's P values in tensor order as float32, plus one slot (0.0).

    The extra slot is quantised too and then replaced by the weight, so the masked vector
    ``[q, weight]`` needs no further copy; it takes the last rounding draw, after those of the
    update, so ``q`` itself is unchanged.  Shape ``(P + 1,)``.
    """
    dim = int(sum(np.size(v) for v in delta.values()))
    flat = np.empty(dim + 1, dtype=np.float32)
    pos = 0
    for v in delta.values():
        a = np.asarray(v).reshape(-1)
        flat[pos:pos + a.size] = a
        pos += a.size
    flat[dim] = 0.0
    return flat, dim


@dataclass
class _RoundSecrets:
    round: int
    mask_private: bytes = field(repr=False)
    mask_public: bytes
    share_private: bytes = field(repr=False)
    share_public: bytes
    stage: str = "advertised"
    self_seed: bytes = field(default=b"", repr=False)
    u1: tuple[str, ...] = ()
    adverts: dict[str, Advertisement] = field(default_factory=dict, repr=False)
    neighbours: frozenset[str] = frozenset()
    #: bundles held: owner -> ShareBundle (includes this site's own bundle)
    held: dict[str, secagg.ShareBundle] = field(default_factory=dict, repr=False)
    u2: tuple[str, ...] = ()


class MaskingClient:
    """One site's masking protocol state across rounds (see module docstring).

    Args:
        cfg: federation configuration (threshold, neighbours, quantisation).
        site: this site's id.
        identity_private: raw Ed25519 identity private key (32 bytes).
        identities: every site's raw Ed25519 identity public key.
    """

    def __init__(self, cfg: Config, site: str, identity_private: bytes,
                 identities: Mapping[str, bytes]) -> None:
        self.cfg = cfg
        self.site = site
        self.federation = cfg.federation.name
        self._identity = identity_private
        self.identities = dict(identities)
        self.threshold = secagg_threshold(cfg)
        # With Skellam noise in the sum the budget depends on the model dimension: mask()
        # derives the parameters from the update's size (as the aggregator does from the model).
        self.params = None if skellam_in_sum(cfg) else quant_params(cfg)
        self._r: _RoundSecrets | None = None
        if site not in self.identities:
            raise FedbratsError(f"site {site}: its own identity public key is not among the "
                                f"provisioned identities")

    def _round(self, round: int, stage: str) -> _RoundSecrets:
        r = self._r
        if r is None or r.round != round or r.stage != stage:
            have = "nothing" if r is None else f"round {r.round} after {r.stage}"
            raise SecAggRefused(f"site {self.site}: out-of-order secure-aggregation step for "
                                f"round {round} (expected stage after {stage}, have {have})")
        return r

    # 1 ------------------------------------------------------------------------------------

    def advertise(self, round: int) -> Advertisement:
        """Fresh round keys, signed.  Starts the round (earlier round state is discarded)."""
        s_priv, s_pub = primitives.x25519_keypair()
        c_priv, c_pub = primitives.x25519_keypair()
        sig = secagg.sign_advertisement(self._identity, federation=self.federation, round=round,
                                        site=self.site, dh_public=s_pub, share_public=c_pub)
        self._r = _RoundSecrets(round, s_priv, s_pub, c_priv, c_pub)
        return Advertisement(self.site, s_pub, c_pub, sig)

    # 2 ------------------------------------------------------------------------------------

    def make_shares(self, round: int, adverts: list[Advertisement], neighbours: list[str],
                    threshold: int, seed: bytes) -> list[EncryptedShares]:
        """Verify the advertised keys and share this site's round secrets with its neighbours.

        Raises:
            SecAggRefused: an advertisement is unsigned, mis-signed or from an unknown site; our
                own keys were altered; the announced threshold, graph seed or neighbours differ
                from the federation's; fewer than ``threshold`` sites advertised.
        """
        r = self._round(round, "advertised")
        by_site: dict[str, Advertisement] = {}
        for a in adverts:
            if a.site in by_site:
                raise SecAggRefused(f"site {self.site}: round {round}: two advertisements for "
                                    f"{a.site}")
            pub = self.identities.get(a.site)
            if pub is None:
                raise SecAggRefused(f"site {self.site}: round {round}: keys advertised for "
                                    f"{a.site!r}, which has no provisioned identity")
            try:
                secagg.verify_advertisement(pub, a.signature, federation=self.federation,
                                            round=round, site=a.site, dh_public=a.mask_public,
                                            share_public=a.share_public)
            except CryptoError:
                raise SecAggRefused(f"site {self.site}: round {round}: the key advertisement of "
                                    f"{a.site} is not signed by its identity key; refusing") \
                    from None
            by_site[a.site] = a
        mine = by_site.get(self.site)
        if mine is None or (mine.mask_public, mine.share_public) != (r.mask_public, r.share_public):
            raise SecAggRefused(f"site {self.site}: round {round}: the aggregator did not relay "
                                f"this site's own keys unchanged")
        if threshold != self.threshold:
            raise SecAggRefused(f"site {self.site}: round {round}: announced threshold "
                                f"{threshold} differs from the federation's {self.threshold}")
        if len(by_site) < self.threshold:
            raise SecAggRefused(f"site {self.site}: round {round}: only {len(by_site)} site(s) "
                                f"advertised keys, fewer than the threshold {self.threshold}")
        if seed != graph_seed(self.federation, round):
            raise SecAggRefused(f"site {self.site}: round {round}: unexpected graph seed")
        u1 = tuple(sorted(by_site))
        graph = neighbour_graph(self.cfg, round, u1)
        if set(neighbours) != graph[self.site]:
            raise SecAggRefused(f"site {self.site}: round {round}: announced neighbours differ "
                                f"from the federation's neighbour graph")
        holders_all = secagg.holder_indices(u1)
        holders = {v: holders_all[v] for v in (*graph[self.site], self.site)}
        r.self_seed = secagg.new_seed()
        bundles = secagg.share_round_secrets(self_seed=r.self_seed, mask_private=r.mask_private,
                                             threshold=self.threshold, holders=holders)
        out = []
        for v in sorted(graph[self.site]):
            secret = primitives.x25519_shared(r.share_private, by_site[v].share_public)
            blob = secagg.encrypt_shares_for(v, bundles[v], own_id=self.site,
                                             shared_secret=secret, federation=self.federation,
                                             round=round)
            out.append(EncryptedShares(self.site, v, blob[:primitives.NONCE_BYTES],
                                       blob[primitives.NONCE_BYTES:]))
        r.held = {self.site: bundles[self.site]}
        r.u1, r.adverts, r.neighbours = u1, by_site, graph[self.site]
        r.stage = "shared"
        return out

    # 3 ------------------------------------------------------------------------------------

    def receive_shares(self, round: int, bundles: list[EncryptedShares], senders: list[str]) -> None:
        """Decrypt the share bundles addressed to this site.

        Raises:
            SecAggRefused: a bundle from a non-neighbour, for another site, or that fails to
                decrypt; a neighbour in U2 sent none; this site is not in U2.
        """
        r = self._round(round, "shared")
        u2 = tuple(sorted(senders))
        if self.site not in u2 or not set(u2) <= set(r.u1):
            raise SecAggRefused(f"site {self.site}: round {round}: announced U2 is inconsistent")
        got = {}
        for b in bundles:
            if b.recipient != self.site or b.sender not in r.neighbours or b.sender not in u2 \
                    or b.sender in got:
                raise SecAggRefused(f"site {self.site}: round {round}: unexpected share bundle "
                                    f"from {b.sender}")
            secret = primitives.x25519_shared(r.share_private, r.adverts[b.sender].share_public)
            try:
                got[b.sender] = secagg.decrypt_shares_from(
                    b.sender, b.nonce + b.ciphertext, own_id=self.site, shared_secret=secret,
                    federation=self.federation, round=round)
            except CryptoError:
                raise SecAggRefused(f"site {self.site}: round {round}: the share bundle from "
                                    f"{b.sender} failed authentication") from None
        missing = [v for v in u2 if v in r.neighbours and v not in got]
        if missing:
            raise SecAggRefused(f"site {self.site}: round {round}: no share bundle from "
                                f"{', '.join(missing)}")
        r.held.update(got)
        r.u2 = u2
        r.stage = "received"

    # 4 ------------------------------------------------------------------------------------

    def mask(self, round: int, delta: Mapping[str, np.ndarray], weight: int, *, noiser=None
             ) -> tuple[dict[str, np.ndarray], int]:
        """Quantise ``weight · Δ`` (clipped), append ``weight``, and mask it.

        Args:
            delta: the update, name -> float32 array, in the global model's tensor order.
            weight: FedAvg weight (training cases), ``1 <= weight <= secagg.max_weight``.
            noiser: distributed DP (``site-distributed``): adds the site's integer Skellam
                share to the quantised update before masking
                (:class:`node.dp.SkellamNoiser`; Agarwal et al. NeurIPS 2021).

        Returns:
            ``({"masked": uint32/uint64 vector of P+1 values}, number of clipped values)``.

        Raises:
            FedbratsError: the update holds non-finite values, the weight is out of range, or
                ``site-distributed`` DP is configured under masking and no ``noiser`` is given;
                nothing is masked or sent.
        """
        r = self._round(round, "received")
        if noiser is None and skellam_in_sum(self.cfg):
            raise FedbratsError(f"site {self.site}: round {round}: dp.mode has 'site-distributed' "
                                f"but no Skellam noiser was given: refusing to mask an un-noised "
                                f"update (the aggregator would decode it as noised)")
        # quantize() refuses non-finite values (checked slice by slice as it goes); only then
        # are the tensors scanned to name the culprit.
        flat, dim = flatten_with_weight_slot(delta)
        params = self.params or quant_params(self.cfg, dim=dim)
        try:
            vec, clipped = quantize.quantize(flat, params, seed=os.urandom(16), weight=weight)
        except CryptoInputError as exc:
            for name, v in delta.items():
                if not np.all(np.isfinite(np.asarray(v, np.float32))):
                    raise FedbratsError(f"site {self.site}: round {round}: refusing to mask the "
                                        f"update: tensor {name} holds non-finite values (NaN/inf)"
                                        ) from None
            raise FedbratsError(f"site {self.site}: round {round}: refusing to mask the update: "
                                f"{exc}") from None
        vec[dim] = weight
        if noiser is not None:
            vec = np.concatenate([noiser(round, vec[:dim], modulus_bits=params.modulus_bits),
                                  vec[dim:]])
        keys = {v: primitives.x25519_shared(r.mask_private, r.adverts[v].mask_public)
                for v in r.neighbours if v in r.u2}
        y = secagg.mask_update(vec, self_seed=r.self_seed, pairwise_keys=keys, own_id=self.site,
                               round=round, federation=self.federation,
                               bits=params.modulus_bits)
        r.stage = "masked"
        return {MASKED_TENSOR: y}, clipped

    # 5 ------------------------------------------------------------------------------------

    def reveal(self, round: int, survivors: list[str], dropped: list[str]) -> list[RevealedShare]:
        """The shares the aggregator may have: seed shares of survivors, key shares of dropouts.

        Raises:
            SecAggRefused: this site is not a survivor; fewer than ``threshold`` survivors; the
                survivor and dropped sets overlap or do not make up U2.
        """
        r = self._round(round, "masked")
        u3, gone = set(survivors), set(dropped)
        if self.site not in u3:
            raise SecAggRefused(f"site {self.site}: round {round}: not listed as a survivor")
        if u3 & gone or (u3 | gone) != set(r.u2):
            raise SecAggRefused(f"site {self.site}: round {round}: survivors and dropped sites "
                                f"do not partition the sites that shared keys")
        if len(u3) < self.threshold:
            raise SecAggRefused(f"site {self.site}: round {round}: only {len(u3)} survivor(s), "
                                f"fewer than the threshold {self.threshold}; revealing nothing")
        out = []
        for owner, bundle in sorted(r.held.items()):
            if owner in u3:
                out.append(RevealedShare(owner, SELF_MASK_SEED, bundle.x, bundle.self_seed_share))
            elif owner in gone:
                out.append(RevealedShare(owner, MASK_KEY, bundle.x, bundle.mask_key_share))
        self._r = None  # the round's secrets are no longer needed
        return out
