"""Pluggable aggregation: how the aggregator sums what the sites send.

A :class:`SecureSum` receives each accepted update as it streams in and produces the round's
result once the round closes.  Memory is O(model), not O(sites × model): updates are folded
into a running sum on arrival.  ``none`` (:class:`PlainFedAvg`) is plaintext weighted FedAvg
(McMahan et al., AISTATS 2017); masking and CKKS plug in here later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedbrats.errors import FedbratsError, ProtocolError, RoundAborted


class UpdateRejected(FedbratsError):
    """An update is unusable (shape mismatch, non-finite values); it is excluded, by name."""


class SecureSum(Protocol):
    """What a protection mode provides to the aggregator."""

    def begin_round(self, round: int, global_model: Mapping[str, np.ndarray]) -> None: ...

    def add(self, site: str, weight: int, tensors: Mapping[str, np.ndarray]) -> None: ...

    def finalize(self, sites: tuple[str, ...]) -> dict[str, np.ndarray]: ...


class PlainFedAvg:
    """Weighted FedAvg on plaintext updates Δᵢ = w_local,i − w_global.

    ``result = w_global + Σᵢ nᵢ Δᵢ / Σᵢ nᵢ`` with nᵢ the site's number of training samples.
    Sums are kept in float64 and cast back to each tensor's dtype.

    Raises (from :meth:`add`):
        UpdateRejected: names the site and tensor for a missing / extra / misshapen tensor or a
            non-finite value (case K10: the site is excluded, the model stays finite).
        ProtocolError: a site adds twice, or the weight is not positive.
    """

    def __init__(self) -> None:
        self._round = 0
        self._global: dict[str, np.ndarray] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0
        self._sites: set[str] = set()

    def begin_round(self, round: int, global_model: Mapping[str, np.ndarray]) -> None:
        self._round = round
        self._global = dict(global_model)
        self._sum = {k: np.zeros(v.shape, np.float64) for k, v in global_model.items()}
        self._weight = 0
        self._sites = set()

    def check(self, site: str, weight: int, tensors: Mapping[str, np.ndarray]) -> None:
        """Validate one update without adding it (see class docstring for errors)."""
        if weight <= 0:
            raise ProtocolError(f"site {site}: update weight must be > 0, got {weight}")
        missing = [k for k in self._global if k not in tensors]
        extra = [k for k in tensors if k not in self._global]
        if missing or extra:
            raise UpdateRejected(
                f"site {site}, round {self._round}: update tensors do not match the model "
                f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for k, ref in self._global.items():
            t = tensors[k]
            if t.shape != ref.shape:
                raise UpdateRejected(f"site {site}, round {self._round}: tensor {k} has shape "
                                     f"{t.shape}, the model has {ref.shape}")
        bad = [f"{k} ({int(t.size - np.count_nonzero(np.isfinite(t)))} value(s))"
               for k, t in ((k, tensors[k]) for k in self._global) if not np.all(np.isfinite(t))]
        if bad:
            raise UpdateRejected(f"site {site}, round {self._round}: non-finite values (NaN/inf) "
                                 f"in tensor(s) {', '.join(bad)}; the update is excluded")

    def add(self, site: str, weight: int, tensors: Mapping[str, np.ndarray]) -> None:
        if site in self._sites:
            raise ProtocolError(f"site {site}: update for round {self._round} already added")
        self.check(site, weight, tensors)
        for k in self._sum:
            self._sum[k] += weight * tensors[k].astype(np.float64)
        self._weight += weight
        self._sites.add(site)

    def finalize(self, sites: tuple[str, ...]) -> dict[str, np.ndarray]:
        if set(sites) != self._sites:
            raise ProtocolError(f"round {self._round}: asked to aggregate {sorted(sites)} but "
                                f"updates were added for {sorted(self._sites)}")
        if self._weight <= 0:
            raise ProtocolError(f"round {self._round}: no update to aggregate")
        out = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for k in self._global:
                out[k] = (self._global[k].astype(np.float64) + self._sum[k] / self._weight) \
                    .astype(self._global[k].dtype)
        bad = [k for k, v in out.items() if not np.all(np.isfinite(v))]
        if bad:
            raise RoundAborted(f"round {self._round}: the new global model would hold non-finite "
                               f"values (overflow of {self._global[bad[0]].dtype}) in tensor(s) "
                               f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing "
                               f"is released and the previous global model stays")
        return out


def make_secure_sum(mode: str) -> SecureSum:
    """The :class:`SecureSum` for ``federation.secure_aggregation``.

    Raises:
        ProtocolError: unknown mode.
    """
    if mode == "none":
        return PlainFedAvg()
    raise ProtocolError(f"secure aggregation mode {mode!r} is not available")
