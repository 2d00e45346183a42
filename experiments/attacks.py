"""Attacks of an honest-but-curious aggregator on what it received, and how they are scored.

Pure functions (numpy / torch, no files, no federation): :mod:`experiments.compare` feeds them
the payloads the aggregator recorded.  Three attacks (issue 7):

**Update inversion** (Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is
it to break privacy in federated learning?", NeurIPS 2020): the attacker knows the model the
update was computed from and looks for an input (and, here, a segmentation) whose gradient points
the way the observed update does: minimise ``1 − cos(∇θ L(x̂, ŷ), g_obs) + α·TV(x̂)`` with Adam on
the *signed* gradient and step decay, as in their reference code (:func:`gradient_matching`).
A single-sample update of a layer ``y = Wx + b`` reveals its input exactly:
``∂L/∂W = δ xᵀ`` and ``∂L/∂b = δ``, so ``x = δᵀ(∂L/∂W) / ‖δ‖²`` (:func:`invert_linear_update`;
Phong et al. 2017, Geiping et al. 2020 §4).  :class:`PatchMLP` is the small segmentation model
the inversion demonstration attacks (a multi-step update of a 3D SegResNet is far beyond what a
CPU attack inverts).

**Membership inference**: scores (higher = "member") turned into ROC AUC with a stratified
bootstrap confidence interval and the TPR at 1 % FPR (Carlini et al., "Membership Inference
Attacks From First Principles", S&P 2022, argue for the low-FPR figure) — :func:`mia_summary`.

**Property inference**: which site has the largest tumours, from one score per *observable
unit* (a site's own update, or a sum of several sites' updates that the attacker cannot split);
:func:`property_accuracy` gives the expected accuracy of picking the top unit and, inside a unit
of several sites, guessing uniformly.

**Protections** as the attacker sees them, reimplemented faithfully for the small-model
demonstration: DP-SGD's per-sample clip and Gaussian noise (:func:`dp_sgd_gradient`), site-level
clip and noise (:func:`site_gaussian`), distributed noise shares (:func:`site_distributed_share`),
and what collusion buys under secure aggregation (:func:`remove_colluders`: the aggregate minus
the colluders' own contributions; with n − 1 colluders it *is* the target's update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

__all__ = [
    "PatchMLP",
    "bootstrap_auc_ci",
    "compute_update",
    "dice",
    "dp_sgd_gradient",
    "flatten",
    "gradient_matching",
    "invert_linear_update",
    "l2_clip",
    "mia_summary",
    "property_accuracy",
    "psnr",
    "remove_colluders",
    "roc_auc",
    "seg_loss",
    "site_distributed_share",
    "site_gaussian",
    "ssim",
    "tpr_at_fpr",
    "unflatten",
]


# ---------------------------------------------------------------------------------------------
# Image and mask scores


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float | None = None, sigma: float = 1.5,
         channel_axis: int | None = 0) -> float:
    """Structural similarity (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004) of ``a`` to ``b``.

    Gaussian-weighted local statistics (σ = 1.5 voxels, K1 = 0.01, K2 = 0.03), mean over all
    positions; with ``channel_axis`` the SSIM of each channel is computed separately and averaged.
    Works for 2D and 3D images.

    Args:
        a: the reconstruction.
        b: the reference (original); sets ``data_range`` (max − min) when it is None.
        channel_axis: axis of the channels (None = single-channel image).

    Returns:
        SSIM in [−1, 1]; 1 only when ``a == b``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
    if channel_axis is not None:
        a = np.moveaxis(a, channel_axis, 0)
        b = np.moveaxis(b, channel_axis, 0)
        return float(np.mean([ssim(x, y, data_range=data_range, sigma=sigma, channel_axis=None)
                              for x, y in zip(a, b)]))
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    rng = rng if rng > 0 else 1.0
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma, mode="reflect", truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a * mu_a
    s_bb = blur(b * b) - mu_b * mu_b
    s_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``a`` against the reference ``b``, dB (inf when equal)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mse = float(np.mean((a - b) ** 2))
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    if mse == 0:
        return math.inf
    return 10.0 * math.log10((rng if rng > 0 else 1.0) ** 2 / mse)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    tot = int(a.sum()) + int(b.sum())
    return 1.0 if tot == 0 else 2.0 * int((a & b).sum()) / tot


# ---------------------------------------------------------------------------------------------
# Membership-inference scores


def _check_scores(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(int)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: P(score of a member > score of a non-member), ties count ½.

    (The Mann–Whitney U statistic over average ranks.)  NaN if either class is empty.
    """
    s, y = _check_scores(scores, labels)
    n1, n0 = int(y.sum()), int((1 - y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = stats.rankdata(s)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], max_fpr: float = 0.01) -> float:
    """Largest true-positive rate at a threshold whose false-positive rate is ≤ ``max_fpr``.

    Members are those with ``score >= t``.  With fewer than 1/max_fpr non-members the only
    admissible thresholds lie above every non-member (FPR 0), so this is the share of members
    scoring strictly above the highest non-member.
    """
    s, y = _check_scores(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    best = 0.0
    for t in np.unique(np.concatenate([pos, [np.inf]])):
        fpr = float(np.mean(neg >= t))
        if fpr <= max_fpr:
            best = max(best, float(np.mean(pos >= t)))
    return best


def bootstrap_auc_ci(scores: Sequence[float], labels: Sequence[int], *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`roc_auc`, resampling members and non-members separately."""
    s, y = _check_scores(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    n1, n0 = pos.size, neg.size
    for i in range(n_boot):
        both = np.concatenate([rng.choice(pos, n1, replace=True), rng.choice(neg, n0, replace=True)])
        ranks = stats.rankdata(both)
        aucs[i] = (ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mia_summary(scores: Sequence[float], labels: Sequence[int], *, seed: int = 0,
                max_fpr: float = 0.01) -> dict:
    """AUC, its 95 % bootstrap CI, TPR at ``max_fpr`` FPR, and the class sizes.

    ``above_chance`` is true when the whole CI lies above 0.5 (the issue's "above 0.5 by more
    than its confidence interval").
    """
    s, y = _check_scores(scores, labels)
    auc = roc_auc(s, y)
    lo, hi = bootstrap_auc_ci(s, y, seed=seed)
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "tpr_at_fpr": tpr_at_fpr(s, y, max_fpr),
            "max_fpr": max_fpr, "members": int(y.sum()), "non_members": int((1 - y).sum()),
            "above_chance": bool(lo > 0.5) if math.isfinite(lo) else False}


# ---------------------------------------------------------------------------------------------
# Property inference


def property_accuracy(unit_scores: Mapping[str, float], unit_sites: Mapping[str, Sequence[str]],
                      true_site: str) -> float:
    """Expected accuracy of "the site with the largest property is in the top-scoring unit".

    The attacker scores every unit it can observe (a site's own update, or a sum it cannot split)
    and answers with the top unit, breaking ties between equal top scores uniformly and choosing
    uniformly among the sites inside the chosen unit.

    Args:
        unit_scores: unit name -> attack score (larger = larger property).
        unit_sites: unit name -> the sites whose updates the unit sums.
        true_site: the site that really has the largest property.

    Returns:
        P(the answer is ``true_site``) under that strategy, in [0, 1].  With a single unit
        holding all n sites (secure aggregation, no colluders) it is 1/n: a guess.
    """
    if not unit_scores:
        sites = sorted({s for v in unit_sites.values() for s in v})
        return 1.0 / len(sites) if sites else math.nan
    top = max(unit_scores.values())
    winners = [u for u, v in unit_scores.items() if v == top]
    p = 0.0
    for u in winners:
        members = list(unit_sites[u])
        if true_site in members:
            p += 1.0 / len(members)
    return p / len(winners)


# ---------------------------------------------------------------------------------------------
# Updates as vectors, and the protections the attacker faces


def flatten(tensors: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Concatenate tensors into one float64 vector (parameter order)."""
    return np.concatenate([np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t,
                                      np.float64).reshape(-1) for t in tensors])


def unflatten(vec: np.ndarray, like: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
    """Split a vector back into arrays shaped like ``like``."""
    out, off = [], 0
    for t in like:
        shape = tuple(t.shape)
        n = int(np.prod(shape)) if shape else 1
        out.append(np.asarray(vec[off:off + n], np.float64).reshape(shape))
        off += n
    if off != vec.size:
        raise ValueError(f"unflatten: vector has {vec.size} values, shapes need {off}")
    return out


def l2_clip(vec: np.ndarray, clip: float) -> np.ndarray:
    """Scale ``vec`` so that ‖vec‖₂ ≤ clip (unchanged if already within)."""
    norm = float(np.linalg.norm(vec))
    return vec * min(1.0, clip / norm) if norm > 0 else vec.copy()


def dp_sgd_gradient(per_sample_grads: Sequence[np.ndarray], *, clip: float, sigma: float,
                    expected_batch: float, rng: np.random.Generator) -> np.ndarray:
    """One DP-SGD step's gradient (Abadi et al., CCS 2016; Opacus ``DPOptimizer``).

    Each per-sample gradient is clipped to ‖g‖₂ ≤ C, the clipped gradients are summed, N(0, σ²C²)
    is added to every coordinate, and the sum is divided by the expected batch size.
    """
    total = np.zeros_like(np.asarray(per_sample_grads[0], np.float64))
    for g in per_sample_grads:
        total += l2_clip(np.asarray(g, np.float64), clip)
    total += rng.normal(0.0, sigma * clip, size=total.shape)
    return total / float(expected_batch)


def site_gaussian(delta: np.ndarray, *, clip: float, sigma: float,
                  rng: np.random.Generator) -> np.ndarray:
    """``site-local`` DP: clip ‖Δ‖₂ ≤ C, add N(0, σ²C²) to every coordinate (node.dp.SiteLocalGaussian)."""
    return l2_clip(delta, clip) + rng.normal(0.0, sigma * clip, size=delta.shape)


def site_distributed_share(delta: np.ndarray, *, clip: float, sigma: float, shares: int,
                           rng: np.random.Generator) -> np.ndarray:
    """``site-distributed`` DP: clip ‖Δ‖₂ ≤ C, add N(0, σ²C²/n) so that n shares sum to σC noise
    (node.dp.SiteDistributedGaussian; the float equivalent of the Skellam shares of mask mode)."""
    return l2_clip(delta, clip) + rng.normal(0.0, sigma * clip / math.sqrt(shares), size=delta.shape)


def remove_colluders(weighted_sum: np.ndarray, total_weight: float,
                     colluders: Mapping[str, tuple[float, np.ndarray]]) -> tuple[np.ndarray, float]:
    """What the aggregator learns about the honest sites when colluders hand over their inputs.

    Under secure aggregation the aggregator learns ``S = Σᵢ wᵢΔᵢ`` and ``W = Σᵢ wᵢ``.  Colluding
    sites give it their own ``(w_c, Δ_c)`` (exactly what they fed into the protocol, noise
    included), so it can compute the weighted mean of the *other* sites:
    ``(S − Σ_c w_cΔ_c) / (W − Σ_c w_c)``.  With n − 1 colluders that is the last honest site's
    update itself.

    Returns:
        ``(mean update of the non-colluding sites, their total weight)``.

    Raises:
        ValueError: the colluders account for all the weight (no honest site left).
    """
    rest = np.asarray(weighted_sum, np.float64).copy()
    w = float(total_weight)
    for wc, dc in colluders.values():
        rest -= float(wc) * np.asarray(dc, np.float64)
        w -= float(wc)
    if w <= 0:
        raise ValueError("the colluders hold all the weight: no honest site is left")
    return rest / w, w


# ---------------------------------------------------------------------------------------------
# The small model of the inversion demonstration, and the attacks on it


class PatchMLP(nn.Module):
    """A small segmentation model for the inversion demonstration.

    ``(B, C, H, W)`` patch → flatten → Linear(C·H·W → hidden) → sigmoid → Linear(hidden → K·H·W)
    → ``(B, K, H, W)`` logits of K regions.  Small enough that gradient matching runs in seconds on
    a CPU; its first layer is fully connected, so a single-sample update reveals the input
    (:func:`invert_linear_update`), the textbook case of Geiping et al. 2020 §4.
    """

    def __init__(self, in_channels: int = 4, size: tuple[int, int] = (24, 24), hidden: int = 64,
                 out_channels: int = 3) -> None:
        super().__init__()
        self.in_shape = (in_channels, *size)
        self.out_shape = (out_channels, *size)
        self.fc1 = nn.Linear(int(np.prod(self.in_shape)), hidden)
        self.fc2 = nn.Linear(hidden, int(np.prod(self.out_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(h).reshape(x.shape[0], *self.out_shape)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over all regions and pixels (mean): a per-sample-decomposable loss."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


def compute_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   lr: float = 0.1) -> list[np.ndarray]:
    """A site's single SGD step on one batch: ``Δ = −lr · ∇θ L(model(x), y)`` (parameter order)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(seg_loss(model(x), y), params)
    return [(-lr * g).detach().cpu().numpy().astype(np.float64) for g in grads]


def invert_linear_update(grad_weight: np.ndarray, grad_bias: np.ndarray) -> np.ndarray:
    """Recover the input of a linear layer ``y = Wx + b`` from one sample's gradient (or update).

    For a single sample ``∂L/∂W = δ xᵀ`` and ``∂L/∂b = δ``: every row of ``∂L/∂W`` is ``x``
    scaled by the matching entry of ``∂L/∂b``.  The least-squares solution over all rows,
    ``x = δᵀ(∂L/∂W) / ‖δ‖²``, is exact; any common factor (a learning rate, a sign) cancels.

    Args:
        grad_weight: ``(out, in)``; grad_bias: ``(out,)``.

    Returns:
        ``x``, shape ``(in,)``.

    Raises:
        ValueError: the bias gradient is zero (the layer received no error signal).
    """
    gw = np.asarray(grad_weight, np.float64)
    gb = np.asarray(grad_bias, np.float64).reshape(-1)
    denom = float(gb @ gb)
    if denom == 0.0:
        raise ValueError("the bias gradient is zero: nothing to invert")
    return (gb @ gw) / denom


def _tv(z: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation over the spatial axes (mean absolute neighbour difference)."""
    out = z.new_zeros(())
    for axis in range(2, z.ndim):
        out = out + torch.diff(z, dim=axis).abs().mean()
    return out


def gradient_matching(model: nn.Module, observed: Sequence[np.ndarray], *, x_shape: Sequence[int],
                      y_shape: Sequence[int], batch: int = 1, steps: int = 300, lr: float = 0.1,
                      tv: float = 1e-2, seed: int = 0, bounds: tuple[float, float] = (-5.0, 5.0),
                      labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Reconstruct a batch of inputs and label maps from an observed update (Geiping et al. 2020).

    The observed update is ``Δ = −lr·∇θ L`` of the batch the site trained on (or the mean of
    several sites' updates); the attacker knows the model the update was computed from and the
    loss, and optimises a dummy batch ``(x̂, ŷ)`` — images and label *logits*, both unknown —
    to minimise ``1 − cos(∇θ L(model(x̂), σ(ŷ)), −Δ) + tv·TV(x̂)`` with Adam on the signed
    gradient, learning-rate decay by 10 at 3/8, 5/8 and 7/8 of the steps, and ``x̂`` kept in
    the box ``bounds`` (the attacker's knowledge of the data range, as Geiping et al.'s
    [0, 1] image box; the default suits z-scored MRI).  The cosine makes the attack blind to the
    update's scale (learning rate, FedAvg weight).

    Args:
        model: the network in the state the update was computed from (not modified).
        observed: the update, one array per parameter of ``model`` (parameter order).
        x_shape, y_shape: one sample's input and label shape (without the batch axis).
        batch: number of samples to reconstruct (a sum of n single-sample updates: n).
        steps, lr, tv, seed, bounds: optimisation settings.
        labels: the batch's label maps ``(batch, *y_shape)`` if the attacker knows them (as
            Geiping et al. assume for classification, where labels leak from the last layer);
            None = reconstruct them too.

    Returns:
        ``(x̂ (batch, *x_shape), p̂ (batch, *y_shape) label probabilities, final matching loss)``.
    """
    params = [p for p in model.parameters()]
    target = [torch.as_tensor(-np.asarray(o), dtype=torch.float32) for o in observed]
    if len(target) != len(params) or any(t.shape != p.shape for t, p in zip(target, params)):
        raise ValueError("observed update does not match the model's parameters")
    t_norm = torch.sqrt(sum((t * t).sum() for t in target))
    gen = torch.Generator().manual_seed(int(seed))
    lo, hi = float(bounds[0]), float(bounds[1])
    xh = torch.randn((batch, *x_shape), generator=gen)
    if lo > -1.0 or hi < 1.0:  # a narrow box: start inside it
        xh = lo + (hi - lo) * torch.rand((batch, *x_shape), generator=gen)
    xh = xh.requires_grad_(True)
    known = labels is not None
    if known:
        y_fixed = torch.as_tensor(np.asarray(labels, np.float32)).reshape(batch, *y_shape)
        yh = torch.logit(y_fixed.clamp(1e-6, 1 - 1e-6))
    else:
        yh = torch.zeros((batch, *y_shape)).requires_grad_(True)
    if float(t_norm) == 0.0:
        return xh.detach().numpy(), torch.sigmoid(yh).detach().numpy(), math.nan
    variables = [xh] if known else [xh, yh]
    opt = torch.optim.Adam(variables, lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(steps * 3 / 8), int(steps * 5 / 8), int(steps * 7 / 8)], gamma=0.1)
    value = math.nan
    for _ in range(steps):
        opt.zero_grad()
        target_y = y_fixed if known else torch.sigmoid(yh)
        grads = torch.autograd.grad(seg_loss(model(xh), target_y), params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target))
        g_norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
        rec = 1.0 - dot / (g_norm * t_norm) + tv * _tv(xh)
        rec.backward()
        value = float(rec.detach())
        for z in variables:
            z.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            xh.clamp_(float(bounds[0]), float(bounds[1]))
    return xh.detach().numpy(), torch.sigmoid(yh).detach().numpy(), value
