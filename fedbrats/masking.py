"""Shared definitions of secure aggregation by pairwise masking (``mask`` mode).

Used by both ends: the node (:mod:`node.secagg_client`) and the aggregator
(:mod:`aggregator.secagg`).  The message types carry only public keys, ciphertexts and the
shares the protocol allows to be revealed; the parameter derivations (quantisation after the
bit-budget check, the neighbour graph and its public seed) are what both ends must compute
identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from crypto import quantize as quant
from crypto import secagg
from fedbrats.config import Config

MASKED_TENSOR = "masked"
SELF_MASK_SEED = "self_mask_seed"
MASK_KEY = "mask_key"


def quant_params(cfg: Config) -> quant.QuantParams:
    """The federation's quantisation parameters after the bit-budget check (maybe widened).

    Raises:
        ConfigError: the budget does not fit even 2^64 (states needed vs available bits).
    """
    sa = cfg.secagg
    return quant.check_budget(quant.QuantParams(clip=sa.clip, bits=sa.bits,
                                                modulus_bits=sa.modulus_bits,
                                                max_sites=cfg.federation.sites,
                                                max_weight=sa.max_weight), widen=True)


def graph_seed(federation: str, round: int) -> bytes:
    """Public seed of round ``round``'s SecAgg+ neighbour graph: SHA-256 of federation ‖ round.

    Derived, not chosen, so every site can check the graph the aggregator announces.
    """
    return hashlib.sha256(b"fedbrats/v1/graph-seed\x00" + federation.encode() + b"\x00"
                          + round.to_bytes(8, "big")).digest()


def neighbour_graph(cfg: Config, round: int, sites: list[str] | tuple[str, ...]) -> dict[str, frozenset[str]]:
    """Each site's neighbours among ``sites`` (complete graph unless ``secagg.neighbours``)."""
    sites = sorted(sites)
    k = cfg.secagg.neighbours
    if k == 0 or k >= len(sites) - 1:
        return {s: frozenset(t for t in sites if t != s) for s in sites}
    return secagg.neighbours(sites, k=k, seed=graph_seed(cfg.federation.name, round))


@dataclass(frozen=True)
class Advertisement:
    """A site's signed round keys (raw X25519 public keys, Ed25519 signature)."""

    site: str
    mask_public: bytes
    share_public: bytes
    signature: bytes


@dataclass(frozen=True)
class EncryptedShares:
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class RevealedShare:
    owner: str
    kind: str  # SELF_MASK_SEED or MASK_KEY
    x: int
    share: bytes
