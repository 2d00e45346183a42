"""The attacks of one configuration, run on what its aggregator received.

Two kinds of measurement, both as the honest-but-curious aggregator:

**On the federation itself** (the SegResNet the daemons trained, the payloads they sent):

* :func:`federation_mia` — membership inference, update-based: for a candidate case c of site k
  the score is the drop of the training loss on c's tumour-centred crop that the update the
  aggregator attributes to k causes, summed over rounds:
  ``Σ_r L(w_{r−1}; c) − L(w_{r−1} + Δ_unit(k),r; c)``.  Members are k's training cases;
  non-members k's validation cases and fresh cases of k's own profile (a second AUC adds a
  held-out site's cases).  The loss-based attack on the final model alone
  (``−L(w_R; c)``) is reported alongside.
* :func:`property_inference` — which site has the largest mean whole-tumour / enhancing-tumour
  volume: the attacker applies each attributable update to the global model and measures the
  tumour volume the result predicts on its own auxiliary cases (the held-out site); the unit
  with the largest prediction is its answer (:func:`experiments.attacks.property_accuracy`),
  per round (``accuracy``) and pooled over all rounds (``pooled_accuracy``: the sum of each
  unit's predictions decides).

**On a small model, offline** (:func:`small_model_studies`; the issue's "small patches and a
small model so it runs on CPU"): every site computes one SGD step of
:class:`experiments.attacks.PatchMLP` on 2D axial patches of its *own* training cases, the
configuration's protections are applied as the daemons would (DP-SGD per-sample clip and noise,
site-level clip and noise, distributed noise shares; masking / encryption decide what the
aggregator gets to see), and the aggregator then

* inverts the update of one patch per site (gradient matching, Geiping et al. 2020), scored by
  SSIM / PSNR of the image and Dice of the recovered tumour mask against the original, and
* runs an update-based membership test (cosine between a candidate patch's gradient and the
  observed update) over the sites' member and non-member patches.

The noise multipliers σ are the configuration's; the clip norms are set to the small model's own
gradient / update norms (so that clipping binds, as it does for SegResNet, whose updates have
norms of 5–15 against a clip of 1), which is the calibration most favourable to the attacker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from experiments import attacks as atk
from experiments.casedata import AttackData, CaseView
from experiments.received import Observation, colluding_sites
from fedbrats.config import Config

State = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# The federated SegResNet


class _Evaluator:
    """Losses and predicted volumes of SegResNet states on tumour-centred crops."""

    def __init__(self, cfg: Config, batch: int = 8) -> None:
        from node.model import build_model
        from node.train import make_loss

        self.model = build_model(cfg.model).eval()
        self.loss = make_loss()
        self.batch = batch

    def _load(self, state: State) -> None:
        from node.model import load_numpy_state

        load_numpy_state(self.model, {k: np.asarray(v, np.float32) for k, v in state.items()})

    def losses(self, state: State, cases: list[CaseView]) -> np.ndarray:
        self._load(state)
        out = []
        with torch.no_grad():
            for i in range(0, len(cases), self.batch):
                part = cases[i:i + self.batch]
                x = torch.as_tensor(np.stack([c.crop_image for c in part]))
                y = torch.as_tensor(np.stack([c.crop_label for c in part]))
                logits = self.model(x)
                out.extend(float(self.loss(logits[j:j + 1], y[j:j + 1])) for j in range(len(part)))
        return np.asarray(out)

    def volumes(self, state: State, cases: list[CaseView]) -> dict[str, float]:
        """Mean predicted (soft) WT and ET volume, voxels, over ``cases``' crops."""
        self._load(state)
        wt = et = 0.0
        with torch.no_grad():
            for i in range(0, len(cases), self.batch):
                part = cases[i:i + self.batch]
                p = torch.sigmoid(self.model(torch.as_tensor(np.stack([c.crop_image for c in part]))))
                wt += float(p[:, 1].sum())
                et += float(p[:, 2].sum())
        return {"wt": wt / len(cases), "et": et / len(cases)}


def _add(state: State, delta: State) -> State:
    return {k: (state[k].astype(np.float64) + delta[k]).astype(np.float32) for k in state}


def _guess_mia(basis: str) -> dict:
    return {"auc": 0.5, "ci_low": math.nan, "ci_high": math.nan, "tpr_at_fpr": math.nan,
            "max_fpr": 0.01, "members": 0, "non_members": 0, "above_chance": False,
            "guess": True, "basis": basis}


def federation_mia(obs: Observation, data: AttackData, cfg: Config, *, seed: int = 0,
                   evaluator: _Evaluator | None = None) -> dict:
    """Update-based membership inference on the federation (see the module docstring)."""
    ev = evaluator or _Evaluator(cfg)
    targets = [s for s in data.sites if s not in obs.colluders]
    if not obs.units or any(m is None for m in obs.models):
        res = _guess_mia(f"{obs.basis}: nothing to score cases with, the attacker guesses")
        res["final_model"] = _guess_mia("no model")
        res["with_heldout"] = _guess_mia("no model")
        return res
    cands = {k: data.train[k] + data.val[k] + data.fresh[k] for k in targets}
    labels = {k: np.array([1] * len(data.train[k]) + [0] * (len(cands[k]) - len(data.train[k])))
              for k in targets}
    held = data.heldout
    score = {k: np.zeros(len(cands[k])) for k in targets}
    score_h = {k: np.zeros(len(held)) for k in targets}
    everyone = [c for k in targets for c in cands[k]]
    for r in range(1, obs.rounds + 1):
        prev = obs.models[r - 1]
        base = ev.losses(prev, everyone + held)
        off = 0
        base_k = {}
        for k in targets:
            base_k[k] = base[off:off + len(cands[k])]
            off += len(cands[k])
        base_h = base[off:]
        for unit in obs.units:
            mine = [k for k in unit.sites if k in cands]
            if not mine:
                continue
            local = _add(prev, unit.deltas[r - 1])
            after = ev.losses(local, [c for k in mine for c in cands[k]] + held)
            off = 0
            for k in mine:
                score[k] += base_k[k] - after[off:off + len(cands[k])]
                off += len(cands[k])
            for k in mine:
                score_h[k] += base_h - after[off:]
    s = np.concatenate([score[k] for k in targets])
    y = np.concatenate([labels[k] for k in targets])
    res = atk.mia_summary(s, y, seed=seed)
    res["guess"] = False
    res["basis"] = obs.basis
    if held:
        s2 = np.concatenate([s] + [score_h[k] for k in targets])
        y2 = np.concatenate([y] + [np.zeros(len(held), int) for _ in targets])
        res["with_heldout"] = atk.mia_summary(s2, y2, seed=seed)
    final = obs.models[-1]
    fin = -ev.losses(final, everyone)
    res["final_model"] = atk.mia_summary(fin, y, seed=seed)
    res["final_model"]["member_loss"] = float(-fin[y == 1].mean())
    res["final_model"]["non_member_loss"] = float(-fin[y == 0].mean())
    return res


def property_inference(obs: Observation, data: AttackData, cfg: Config, *,
                       evaluator: _Evaluator | None = None) -> dict:
    """Which site has the largest tumours / enhancing tumour (see the module docstring)."""
    n = len(data.sites)
    out: dict = {"chance": 1.0 / n, "truth": {p: data.largest(p) for p in ("wt", "et")},
                 "margin": {p: data.margin(p) for p in ("wt", "et")},
                 "site_means": data.truth, "basis": obs.basis}
    if not data.heldout:
        out.update(accuracy=math.nan, per_property={}, note="no auxiliary cases (real data)")
        return out
    if not obs.units or any(m is None for m in obs.models):
        out.update(accuracy=1.0 / n, per_property={"wt": [1.0 / n] * obs.rounds,
                                                   "et": [1.0 / n] * obs.rounds},
                   pooled={"wt": 1.0 / n, "et": 1.0 / n}, pooled_accuracy=1.0 / n,
                   guess=True, note="nothing attributable: the attacker guesses (1/n)")
        return out
    ev = evaluator or _Evaluator(cfg)
    sites_of = {u.name: u.sites for u in obs.units}
    per: dict[str, list[float]] = {"wt": [], "et": []}
    predicted: list[dict] = []
    for r in range(1, obs.rounds + 1):
        prev = obs.models[r - 1]
        vols = {u.name: ev.volumes(_add(prev, u.deltas[r - 1]), data.heldout) for u in obs.units}
        predicted.append(vols)
        for p in ("wt", "et"):
            per[p].append(atk.property_accuracy({u: v[p] for u, v in vols.items()}, sites_of,
                                                data.largest(p)))
    # The attacker can also pool the evidence of all rounds: one answer per property.
    final = {p: atk.property_accuracy({u: float(sum(v[u][p] for v in predicted)) for u in sites_of},
                                      sites_of, data.largest(p)) for p in ("wt", "et")}
    out.update(accuracy=float(np.mean(per["wt"] + per["et"])), per_property=per,
               pooled=final, pooled_accuracy=float(np.mean(list(final.values()))),
               predicted_volumes=predicted, guess=len(obs.units) == 1)
    return out


# ---------------------------------------------------------------------------------------------
# The small model, offline


@dataclass(frozen=True)
class Protection:
    """The protections of a configuration, as they act on one site's update.

    Attributes:
        secure: ``none``, ``mask`` or ``ckks``.
        sample_sigma: DP-SGD noise multiplier (None: no DP-SGD).
        site_kind: ``site-local``, ``site-distributed`` or None.
        site_sigma: site-level noise multiplier.
        shares: number of noise shares a sum is calibrated for (``federation.min_sites``).
        expected_batch: DP-SGD expected batch size (``training.batch_size``).
    """

    secure: str
    sample_sigma: float | None
    site_kind: str | None
    site_sigma: float
    shares: int
    expected_batch: int

    @property
    def label(self) -> str:
        parts = []
        if self.sample_sigma is not None:
            parts.append(f"DP-SGD σ={self.sample_sigma:g}")
        if self.site_kind:
            parts.append(f"{self.site_kind} σ={self.site_sigma:g}")
        parts.append({"none": "plaintext", "mask": "masked sum", "ckks": "CKKS"}[self.secure])
        return ", ".join(parts)


def dp_sgd_sigma(cfg: Config, train_cases: int) -> float:
    """DP-SGD σ of a configuration: ``dp.noise_multiplier``, or (when 0) what Opacus derives from
    ``dp.target_epsilon`` over ``rounds × local_steps`` steps at q = batch / training cases."""
    dp = cfg.dp
    if dp.noise_multiplier > 0 or dp.target_epsilon <= 0:
        return float(dp.noise_multiplier)
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, cfg.training.batch_size / max(1, train_cases))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                          sample_rate=q,
                                          steps=cfg.federation.rounds * cfg.training.local_steps,
                                          accountant=dp.accountant))


def protection_of(cfg: Config, data: AttackData) -> Protection:
    modes = tuple(cfg.dp.mode)
    sample = dp_sgd_sigma(cfg, min(data.weights.values())) if "dp-sgd" in modes else None
    kind = next((m for m in ("site-local", "site-distributed") if m in modes), None)
    return Protection(secure=cfg.federation.secure_aggregation, sample_sigma=sample,
                      site_kind=kind, site_sigma=float(cfg.dp.site_noise_multiplier),
                      shares=int(cfg.federation.min_sites),
                      expected_batch=int(cfg.training.batch_size))


def _grads(model: torch.nn.Module, xs: list[np.ndarray], ys: list[np.ndarray]) -> list[np.ndarray]:
    """Per-sample gradients (flattened, float64) of :func:`attacks.seg_loss`."""
    params = list(model.parameters())
    out = []
    for x, y in zip(xs, ys):
        g = torch.autograd.grad(atk.seg_loss(model(torch.as_tensor(x[None])), torch.as_tensor(y[None])),
                                params)
        out.append(atk.flatten(g))
    return out


def _site_updates(per_site_grads: dict[str, list[np.ndarray]], prot: Protection, lr: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each site's protected update from its per-sample gradients (one SGD step on its batch)."""
    sample_clip = float(np.median([np.linalg.norm(g) for gs in per_site_grads.values() for g in gs]))
    deltas = {}
    for s, gs in per_site_grads.items():
        if prot.sample_sigma is not None:
            # A single patch is a Poisson batch of one (divided by the expected batch size);
            # a batch of patches is the whole expected batch.
            batch = len(gs) if len(gs) > 1 else prot.expected_batch
            g = atk.dp_sgd_gradient(gs, clip=sample_clip, sigma=prot.sample_sigma,
                                    expected_batch=batch, rng=rng)
        else:
            g = np.mean(gs, axis=0)
        deltas[s] = -lr * g
    if prot.site_kind:
        clip = min(float(np.linalg.norm(d)) for d in deltas.values())
        for s in deltas:
            if prot.site_kind == "site-local":
                deltas[s] = atk.site_gaussian(deltas[s], clip=clip, sigma=prot.site_sigma, rng=rng)
            else:
                deltas[s] = atk.site_distributed_share(deltas[s], clip=clip, sigma=prot.site_sigma,
                                                       shares=prot.shares, rng=rng)
    return deltas


def _payload_noise(cipher: np.ndarray | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """What a CKKS payload "says" about an update when read as one: its bytes, centred."""
    if cipher is None or cipher.size < size:
        cipher = rng.integers(0, 256, size=size, dtype=np.uint8)
    return (cipher[:size].astype(np.float64) - 127.5) / 127.5


def _observations(deltas: dict[str, np.ndarray], sites: list[str], secure: str, k: int,
                  cipher: dict[str, np.ndarray | None], rng: np.random.Generator
                  ) -> tuple[dict[str, tuple[str, np.ndarray, int]], str]:
    """Per honest site: (observation key, the vector the aggregator can attribute to it, batch)."""
    colluders = colluding_sites(sites, k)
    honest = [s for s in sites if s not in colluders]
    size = next(iter(deltas.values())).size
    if secure == "none":
        return {s: (s, deltas[s], 1) for s in honest}, "each site's own update"
    if secure == "ckks" and not colluders:
        return ({s: (f"ct-{s}", _payload_noise(cipher.get(s), size, rng), 1) for s in honest},
                "the site's ciphertext bytes read as an update (nothing else is available)")
    if secure == "ckks":
        return ({s: (s, deltas[s], 1) for s in honest},
                f"each site's update, decrypted with {colluders[0]}'s shared CKKS key")
    total = sum(deltas[s] for s in sites)
    rest, _w = atk.remove_colluders(total, len(sites), {c: (1.0, deltas[c]) for c in colluders})
    key = "sum-" + ",".join(honest)
    text = ("the mean of all sites' updates (the unmasked sum)" if not colluders else
            f"the sum minus {len(colluders)} colluder(s)' updates: "
            + ("the target's own update" if len(honest) == 1 else f"the mean of {len(honest)} sites"))
    return {s: (key, rest, len(honest)) for s in honest}, text


def small_model_studies(cfg: Config, data: AttackData, prot: Protection, *, collude: int,
                        cipher: dict[str, np.ndarray | None], patch: int, hidden: int,
                        steps: int, lr: float, seed: int, progress=print) -> dict:
    """Inversion and update-level membership inference on :class:`attacks.PatchMLP`.

    Returns a dict with ``inversion`` (per honest target: SSIM, PSNR, Dice; their means; the
    chance levels; the basis), ``inversion_sweep`` (target site-1's SSIM for K = 0..n−1 under
    secure aggregation), ``update_mia`` (AUC etc.) and, under ``figure``, site-1's original patch
    and best reconstruction for the figure.
    """
    sites = data.sites
    torch.manual_seed(seed)
    model = atk.PatchMLP(in_channels=4, size=(patch, patch), hidden=hidden, out_channels=3)
    rng = np.random.default_rng(seed)
    like = [p.detach() for p in model.parameters()]
    x_shape = (4, patch, patch)
    y_shape = (3, patch, patch)

    # --- inversion: one patch per site, single-sample updates
    targets = {s: data.train[s][0] for s in sites}
    grads = {s: _grads(model, [targets[s].patch], [targets[s].patch_label]) for s in sites}
    deltas = _site_updates(grads, prot, lr, rng)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def invert(key: str, vec: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if key not in cache:
            progress(f"    inverting {key} (batch {batch}, {steps} steps)")
            xh, ph, _ = atk.gradient_matching(model, atk.unflatten(vec, like), x_shape=x_shape,
                                              y_shape=y_shape, batch=batch, steps=steps,
                                              seed=seed)
            cache[key] = (xh, ph)
        return cache[key]

    def score(site: str, key: str, vec: np.ndarray, batch: int) -> dict:
        xh, ph = invert(key, vec, batch)
        t = targets[site]
        ss = [atk.ssim(x, t.patch) for x in xh]
        i = int(np.argmax(ss))
        return {"ssim": ss[i], "psnr": atk.psnr(xh[i], t.patch),
                "dice": atk.dice(ph[i][1] > 0.5, t.patch_label[1] > 0.5), "index": i}

    obs, basis = _observations(deltas, sites, prot.secure, collude, cipher, rng)
    per_target = {s: score(s, *obs[s]) for s in obs}
    first = sites[0]
    fig_key, fig_vec, fig_batch = obs[first]
    xh, ph = invert(fig_key, fig_vec, fig_batch)
    best = per_target[first]["index"]
    figure = {"original": targets[first].patch, "original_label": targets[first].patch_label,
              "reconstruction": xh[best], "reconstruction_label": ph[best]}

    reference = data.heldout or [c for s in sites for c in data.val[s]]
    chance = {"ssim": [], "psnr": [], "dice": []}
    for s in sites:
        for c in reference:
            chance["ssim"].append(atk.ssim(c.patch, targets[s].patch))
            chance["psnr"].append(atk.psnr(c.patch, targets[s].patch))
            chance["dice"].append(atk.dice(c.patch_label[1] > 0.5, targets[s].patch_label[1] > 0.5))
    inversion = {
        "basis": basis, "protection": prot.label, "per_target": per_target,
        "ssim": float(np.mean([v["ssim"] for v in per_target.values()])),
        "psnr": float(np.mean([v["psnr"] for v in per_target.values()])),
        "dice": float(np.mean([v["dice"] for v in per_target.values()])),
        "chance_ssim": float(np.mean(chance["ssim"])),
        "chance_ssim_p95": float(np.quantile(chance["ssim"], 0.95)),
        "chance_psnr": float(np.mean(chance["psnr"])),
        "chance_dice": float(np.mean(chance["dice"])),
        "patch": patch, "hidden": hidden, "steps": steps,
    }
    inversion["above_chance"] = bool(min(v["ssim"] for v in per_target.values())
                                     > inversion["chance_ssim_p95"])

    sweep = {}
    if prot.secure in ("mask", "ckks"):
        for k in range(len(sites)):
            o, b = _observations(deltas, sites, prot.secure, k, cipher, rng)
            sc = score(first, *o[first])
            sweep[str(k)] = {"ssim": sc["ssim"], "psnr": sc["psnr"], "dice": sc["dice"], "basis": b}

    # --- update-level membership: one step on all the site's member patches
    members = {s: [p for c in data.train[s] for p in c.mia_patches] for s in sites}
    nonmem = {s: [p for c in data.val[s] + data.fresh[s] for p in c.mia_patches] for s in sites}
    mgrads = {s: _grads(model, [p[0] for p in members[s]], [p[1] for p in members[s]]) for s in sites}
    ngrads = {s: _grads(model, [p[0] for p in nonmem[s]], [p[1] for p in nonmem[s]]) for s in sites}
    mdeltas = _site_updates(mgrads, prot, lr, rng)
    mobs, mbasis = _observations(mdeltas, sites, prot.secure, collude, cipher, rng)
    scores, labels = [], []
    for s, (_key, vec, _b) in mobs.items():
        v = -vec / (np.linalg.norm(vec) + 1e-30)
        for lab, gs in ((1, mgrads[s]), (0, ngrads[s])):
            for g in gs:
                scores.append(float(g @ v / (np.linalg.norm(g) + 1e-30)))
                labels.append(lab)
    update_mia = atk.mia_summary(scores, labels, seed=seed)
    update_mia["basis"] = mbasis
    return {"inversion": inversion, "inversion_sweep": sweep, "update_mia": update_mia,
            "figure": figure}
