"""What the aggregator of a finished federation saw, as the attacks use it.

A run of :func:`fedbrats.simulate.simulate` with ``aggregator.record_dir = DIR/<conf>/received``
leaves every payload the aggregator received (``round-NNNN/<site>-<stage>.npz|.json``) and, in
``none`` and ``mask`` mode, the global model after each round (``checkpoints/round-NNNN.pt``).
:func:`observe` turns that into an :class:`Observation`: the global models the aggregator knows
and the *units* it can attribute updates to —

* ``none``: every site's own plaintext update Δᵢ (recorded, stage ``training``);
* ``mask``: only the weighted mean of all sites, ``w_r − w_{r−1}`` (the masked vectors are
  uniformly random); with K colluders (the last K sites) it also gets their own updates and
  subtracts them (:func:`experiments.attacks.remove_colluders`): the colluders become units of
  their own and the rest is one unit of the n − K honest sites (with K = n − 1: the target alone).
  The colluders' updates are recomputed by replaying their local training
  (:func:`replay_updates`), which is exact on the CPU unless DP noise was added (it is drawn
  from ``os.urandom`` and cannot be replayed);
* ``ckks``: ciphertexts only; the aggregator never holds a model after round 0.  All sites share
  the secret key, so *one* colluding site lets it decrypt every site's recorded ciphertext:
  every site's update and every global model are then exposed.

:func:`wire_bytes` estimates the payload bytes on the wire from the same records.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbrats.config import Config, load_config, with_overrides
from fedbrats.errors import FedbratsError

State = dict[str, np.ndarray]


@dataclass
class Unit:
    """Updates the aggregator can attribute to a set of sites.

    Attributes:
        name: ``site-2``, or ``sum(site-1,site-2,site-3)``.
        sites: the sites whose (weighted mean) update this is.
        deltas: per round 1..R, the weighted mean update of ``sites`` (name -> array).
    """

    name: str
    sites: tuple[str, ...]
    deltas: list[State]


@dataclass
class Observation:
    """What the aggregator has after the federation (see the module docstring).

    Attributes:
        mode: ``none``, ``mask`` or ``ckks``.
        rounds: completed rounds R.
        models: global models ``w_0 .. w_R`` as the aggregator knows them; entries are None where
            it does not (ckks without a colluder: only ``w_0``).
        units: attributable updates (empty when nothing is decodable).
        colluders: the colluding sites.
        basis: one line saying what the attacks run on.
        exact: False when the colluders' inputs could only be approximated.
        notes: further remarks for the report.
    """

    mode: str
    rounds: int
    models: list[State | None]
    units: list[Unit]
    colluders: list[str]
    basis: str
    exact: bool = True
    notes: list[str] = field(default_factory=list)

    def unit_of(self, site: str) -> Unit | None:
        return next((u for u in self.units if site in u.sites), None)


def _round_dir(run: Path, r: int) -> Path:
    return run / "received" / f"round-{r:04d}"


def _load_npz(path: Path) -> State:
    with np.load(path) as z:
        return {k: np.array(z[k]) for k in z.files}


def rounds_completed(run: Path) -> int:
    try:
        return int(json.loads((run / "summary.json").read_text(encoding="utf-8"))["rounds_completed"])
    except (OSError, ValueError, KeyError):
        return 0


def colluding_sites(sites: list[str], k: int) -> list[str]:
    """The colluders of ``--collude K``: the last K sites (site-1, the inversion target, is honest
    for every K ≤ n − 1)."""
    return list(sites[len(sites) - k:]) if k > 0 else []


def _checkpoints(run: Path, cfg: Config, rounds: int) -> list[State]:
    from aggregator.server import initial_global_model
    from node.model import read_model_file

    models = [initial_global_model(cfg)]
    for r in range(1, rounds + 1):
        state, _ = read_model_file(run / "checkpoints" / f"round-{r:04d}.pt")
        models.append(state)
    return models


def _diff(a: State, b: State) -> State:
    return {k: (a[k].astype(np.float64) - b[k].astype(np.float64)) for k in b}


def replay_updates(run: Path, site: str, models: list[State], progress=print) -> list[State]:
    """Recompute a colluding site's updates Δ_r (r = 1..R) by replaying its local training.

    Builds the site's real :class:`node.daemon.Node` from the TOML the simulation wrote
    (``configs/<site>.toml``) with its state in a temporary folder (no privacy ledger of the run
    is touched), trains round r from the recorded global model ``w_{r−1}`` in order (Adam's state
    carries over as in the daemon) and applies the site's DP filters
    (:func:`node.dp.make_dp_filters`).  On the CPU this reproduces the daemon's updates bit for
    bit unless DP adds random noise (DP-SGD, site-level noise, and the Skellam noise a masking
    site adds after quantisation are drawn afresh and cannot be replayed).
    """
    import torch

    from node.daemon import Node

    threads = torch.get_num_threads()
    cfg_site = load_config(run / "configs" / f"{site}.toml")
    out: list[State] = []
    with tempfile.TemporaryDirectory(prefix="fedbrats-replay-") as tmp:
        cfg_site = with_overrides(cfg_site, node={"state_dir": tmp})
        try:
            node = Node(cfg_site)
            filters = []
            if tuple(cfg_site.dp.mode):  # as the daemon's SiteSession builds them
                from node.dp import make_dp_filters

                filters = make_dp_filters(cfg_site, state_dir=tmp, site=site)
            for r in range(1, len(models)):
                progress(f"    replaying {site}'s local training, round {r}/{len(models) - 1}")
                delta = node.train(r, models[r - 1]).delta
                for f in filters:
                    delta = f(r, delta)
                out.append({k: np.asarray(v, np.float64) for k, v in delta.items()})
        finally:
            torch.set_num_threads(threads)
    return out


def _ckks_decrypt_all(run: Path, cfg: Config, colluder: str, sites: list[str], rounds: int,
                      progress=print) -> tuple[dict[str, list[State]], dict[str, float], list[State]]:
    """With a colluder's secret context: every site's (Δᵢ per round), weights, and global models."""
    from aggregator.ckks import tensors_to_chunks
    from aggregator.server import initial_global_model
    from crypto import ckks

    ctx_path = run / "federation" / colluder / "ckks-secret.ctx"
    ctx = ckks.load_context(ctx_path.read_bytes(), expect_secret=True)
    w0 = initial_global_model(cfg)
    names = list(w0)
    shapes = {k: w0[k].shape for k in names}
    n = sum(int(v.size) for v in w0.values())
    deltas: dict[str, list[State]] = {s: [] for s in sites}
    weights: dict[str, float] = {}
    models: list[State] = [w0]
    for r in range(1, rounds + 1):
        progress(f"    decrypting round {r}'s ciphertexts with {colluder}'s key")
        total = np.zeros(n)
        wsum = 0.0
        for s in sites:
            chunks = tensors_to_chunks(_load_npz(_round_dir(run, r) / f"{s}-training.npz"), s)
            wx, w = ckks.decrypt_aggregate(chunks, ctx, n, workers=1)
            weights[s] = round(w)
            total += wx
            wsum += w
            flat = wx / w
            st, off = {}, 0
            for k in names:
                size = int(np.prod(shapes[k]))
                st[k] = flat[off:off + size].reshape(shapes[k])
                off += size
            deltas[s].append(st)
        prev = models[-1]
        mean = total / wsum
        st, off = {}, 0
        for k in names:
            size = int(np.prod(shapes[k]))
            st[k] = (prev[k].astype(np.float64) + mean[off:off + size].reshape(shapes[k])).astype(np.float32)
            off += size
        models.append(st)
    return deltas, weights, models


def observe(run: Path, cfg: Config, *, sites: list[str], weights: dict[str, int], collude: int = 0,
            progress=print) -> Observation:
    """What the aggregator of the run in ``run`` can attack (see the module docstring).

    Args:
        run: the configuration's folder (``simulate``'s ``out``, with ``received/``).
        cfg: the configuration the federation ran with.
        sites: the federation's sites.
        weights: each site's FedAvg weight (training cases), as the colluders report them.
        collude: number of colluding sites K (0 ≤ K ≤ n − 1).

    Raises:
        FedbratsError: the run recorded nothing, or K is out of range.
    """
    mode = cfg.federation.secure_aggregation
    rounds = rounds_completed(run)
    if rounds < 1:
        raise FedbratsError(f"{run}: the federation completed no round; nothing to attack")
    if not 0 <= collude <= len(sites) - 1:
        raise FedbratsError(f"--collude {collude}: must be between 0 and {len(sites) - 1}")
    colluders = colluding_sites(sites, collude)
    honest = [s for s in sites if s not in colluders]
    if {"site-local", "site-distributed"} & set(cfg.dp.mode):
        # Under site-level DP the sites weigh their updates equally (DP-FedAvg).
        weights = {s: 1 for s in sites}
    if mode == "none":
        models = _checkpoints(run, cfg, rounds)
        units = []
        for s in sites:
            deltas = [{k: v.astype(np.float64) for k, v in
                       _load_npz(_round_dir(run, r) / f"{s}-training.npz").items()}
                      for r in range(1, rounds + 1)]
            units.append(Unit(s, (s,), deltas))
        return Observation(mode, rounds, models, units, colluders,
                           "each site's own plaintext update (as received)")
    if mode == "mask":
        models = _checkpoints(run, cfg, rounds)
        means = [_diff(models[r], models[r - 1]) for r in range(1, rounds + 1)]
        if not colluders:
            unit = Unit(f"sum({','.join(sites)})", tuple(sites), means)
            return Observation(mode, rounds, models, [unit], colluders,
                               "the unmasked weighted mean of all sites (w_r − w_{r−1}); the "
                               "masked inputs themselves are uniformly random")
        clip = float(cfg.secagg.clip)
        replayed = {c: replay_updates(run, c, models, progress) for c in colluders}
        units = []
        for c in colluders:
            units.append(Unit(c, (c,), [{k: np.clip(v, -clip, clip) for k, v in d.items()}
                                        for d in replayed[c]]))
        W = float(sum(weights[s] for s in sites))
        rest = []
        for r in range(rounds):
            st = {}
            for k in means[r]:
                total = means[r][k] * W
                for c in colluders:
                    total = total - weights[c] * np.clip(replayed[c][r][k], -clip, clip)
                st[k] = total / (W - sum(weights[c] for c in colluders))
            rest.append(st)
        name = honest[0] if len(honest) == 1 else f"sum({','.join(honest)})"
        units.append(Unit(name, tuple(honest), rest))
        exact = not tuple(cfg.dp.mode)
        notes = [] if exact else [
            "the colluders' updates were replayed without their original DP noise (it came "
            "from os.urandom), so the subtraction leaves that noise in: a weaker attack than "
            "real colluders, who know their noise, could mount"]
        return Observation(mode, rounds, models, units, colluders,
                           f"the unmasked mean minus the updates of {len(colluders)} colluding "
                           f"site(s) ({', '.join(colluders)}): "
                           + ("the target's own update" if len(honest) == 1 else
                              f"the mean of {len(honest)} honest sites"), exact, notes)
    if mode == "ckks":
        if not colluders:
            from aggregator.server import initial_global_model

            return Observation(mode, rounds, [initial_global_model(cfg)] + [None] * rounds, [],
                               colluders, "ciphertexts only: no decodable update and no model "
                               "after round 0")
        deltas, _w, models = _ckks_decrypt_all(run, cfg, colluders[0], sites, rounds, progress)
        units = [Unit(s, (s,), deltas[s]) for s in sites]
        return Observation(mode, rounds, models, units, colluders,
                           f"every site's update, decrypted with colluding {colluders[0]}'s copy "
                           f"of the federation's shared CKKS secret key")
    raise FedbratsError(f"unknown secure_aggregation mode {mode!r}")


def wire_bytes(run: Path, cfg: Config, *, model_bytes: int, sites: list[str]) -> dict:
    """Payload bytes on the wire, from what the aggregator recorded.

    Uplink: every recorded message (tensor bytes of update payloads, JSON size of key/share
    messages).  Downlink: per site the round-1 global model plus each round's result (the new
    global model in ``none``/``mask`` mode; in ``ckks`` mode the encrypted aggregate, which has
    the size of one site's ciphertext), plus, in ``mask`` mode, the key advertisements of all
    sites and the share bundles addressed to it (counted as the size of those it sent).
    gRPC/TLS framing is not counted.
    """
    rounds = rounds_completed(run)
    up = down = 0
    for r in range(1, rounds + 1):
        d = _round_dir(run, r)
        if not d.is_dir():
            continue
        adverts = 0
        update_sizes = []
        for f in sorted(d.iterdir()):
            if f.suffix == ".npz":
                with np.load(f) as z:
                    size = sum(int(z[k].nbytes) for k in z.files)
                update_sizes.append(size)
            else:
                size = f.stat().st_size
                if f.name.endswith("-advertise_keys.json"):
                    adverts += size
                elif f.name.endswith("-share_keys.json"):
                    down += size
            up += size
        down += len(sites) * adverts
        if cfg.federation.secure_aggregation == "ckks":
            down += len(sites) * (int(np.mean(update_sizes)) if update_sizes else 0)
        else:
            down += len(sites) * model_bytes
    down += len(sites) * model_bytes  # the round-1 global model
    per_round = (up + down) / rounds if rounds else math.nan
    return {"uplink_mb": up / 1e6, "downlink_mb": down / 1e6, "mb_per_round": per_round / 1e6}
