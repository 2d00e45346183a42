"""The two seams between local training and the wire: update filters and update protection.

After local training a node forms the update Δ = w_local − w_global (name -> float32 array) and
passes it through:

1. **filters** (:func:`make_update_filters`): privacy filters that change Δ itself — clipping,
   site-level DP noise, partial sharing, SVT (differential privacy, added later).  ``none``
   means no filter.
2. **protection** (:func:`make_protector`): how Δ is hidden from the aggregator on the wire —
   ``none`` (plaintext, FedAvg weight in the metadata), with pairwise masking and CKKS added
   later.  A protector also turns the round's published result back into the new global model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedbrats import wire
from fedbrats.config import Config
from fedbrats.errors import FedbratsError

Tensors = Mapping[str, np.ndarray]


class UpdateFilter(Protocol):
    """Transforms an update Δ (name -> array) for one round; must not modify its input."""

    name: str

    def __call__(self, round: int, delta: Tensors) -> dict[str, np.ndarray]: ...


class UpdateProtector(Protocol):
    """Turns an update into a wire payload and a published result into a global model."""

    scheme: str

    def protect(self, round: int, delta: Tensors, num_samples: int) -> wire.Payload: ...

    def recover(self, round: int, result: wire.Payload) -> dict[str, np.ndarray]: ...


class PlainProtector:
    """``secure_aggregation = "none"``: the update travels in plaintext.

    Raises (from :meth:`protect`):
        FedbratsError: the update holds non-finite values (names the tensor); it is never sent.
    """

    scheme = "plain"

    def protect(self, round: int, delta: Tensors, num_samples: int) -> wire.Payload:
        for name, arr in delta.items():
            if not np.all(np.isfinite(arr)):
                raise FedbratsError(f"round {round}: update tensor {name} holds non-finite "
                                    f"values; refusing to send it")
        return wire.pack_tensors(delta, scheme=self.scheme)

    def recover(self, round: int, result: wire.Payload) -> dict[str, np.ndarray]:
        return wire.unpack_tensors(result)


def make_update_filters(cfg: Config) -> list[UpdateFilter]:
    """The filters configured for this site, in application order (none yet: DP adds them)."""
    return []


def make_protector(cfg: Config) -> UpdateProtector:
    """The protection for ``federation.secure_aggregation``.

    Raises:
        FedbratsError: the mode is not available.
    """
    mode = cfg.federation.secure_aggregation
    if mode == "none":
        return PlainProtector()
    raise FedbratsError(f"federation.secure_aggregation = {mode!r} is not available")


def model_delta(local: Tensors, global_: Tensors) -> dict[str, np.ndarray]:
    """Δ = w_local − w_global for every tensor of the global model (float32)."""
    return {k: (np.asarray(local[k], np.float32) - np.asarray(g, np.float32))
            for k, g in global_.items()}
