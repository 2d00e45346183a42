"""Plots of ``fedbrats experiment compare`` (matplotlib, Agg backend: no display needed).

* ``privacy_utility.png`` — mean Dice against ε (sample- and site-level, log scale); a
  configuration without a finite ε sits on the "no DP (ε = ∞)" line at the right.
* ``attack_success.png`` — per configuration: inversion SSIM (with the chance band), membership
  AUC with 95 % CIs (federation and small-model update) and property-inference accuracy (with
  the 1/n line).
* ``reconstructions.png`` — for each configuration, site-1's original patch beside what the
  aggregator reconstructed from what it saw (FLAIR channel and whole-tumour mask).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FLAIR = 3  # channel of the FLAIR contrast in node.data.MODALITIES order


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _get(r: dict, *path, default=math.nan):
    cur = r
    for p in path:
        if not isinstance(cur, dict) or p not in cur or cur[p] is None:
            return default
        cur = cur[p]
    return cur


def privacy_utility(out: Path, results: list[dict]) -> Path:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    eps_all = [_num(_get(r, "dp", k)) for r in results for k in ("epsilon_sample", "epsilon_site")]
    finite = [e for e in eps_all if math.isfinite(e) and e > 0]
    hi = max(finite) if finite else 10.0
    lo = min(finite) if finite else 1.0
    inf_x = hi * 10 ** 1.3
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    no_eps = [r["configuration"] for r in results
              if not any(math.isfinite(_num(_get(r, "dp", k))) for k in ("epsilon_sample", "epsilon_site"))]
    for i, r in enumerate(results):
        dice = _num(_get(r, "dice", "mean"))
        c = colours[i % len(colours)]
        points = [(k, _num(_get(r, "dp", k))) for k in ("epsilon_sample", "epsilon_site")]
        points = [(k, e) for k, e in points if math.isfinite(e)]
        if not points:  # spread the no-DP points a little so that none hides another
            j = no_eps.index(r["configuration"])
            x = inf_x * 10 ** (0.12 * (j - (len(no_eps) - 1) / 2))
            ax.scatter([x], [dice], color=c, marker="D", s=60, label=f"{r['configuration']} (no ε)")
            continue
        for k, e in points:
            ax.scatter([e], [dice], color=c, marker="o" if k == "epsilon_sample" else "s", s=60,
                       label=f"{r['configuration']} ({'sample' if k == 'epsilon_sample' else 'site'} ε)")
    ax.axvline(inf_x / 10 ** 0.6, color="0.6", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(lo / 3, inf_x * 10 ** (0.12 * len(no_eps) / 2 + 0.3))
    decades = range(math.floor(math.log10(lo / 3)) + 1, math.floor(math.log10(hi * 10 ** 0.5)) + 1)
    ticks = [10.0 ** k for k in decades]
    ax.set_xticks(ticks + [inf_x])
    ax.set_xticklabels([f"$10^{{{k}}}$" for k in decades] + ["∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("ε (δ as configured; lower = more private)")
    ax.set_ylabel("mean Dice (TC, WT, ET), last round")
    ax.set_ylim(0, 1)
    ax.set_title("Privacy–utility: Dice against ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / "privacy_utility.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attack_success(out: Path, results: list[dict], n_sites: int) -> Path:
    plt = _mpl()
    names = [r["configuration"] for r in results]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))

    ax = axes[0]
    ssim = [_num(_get(r, "inversion", "ssim")) for r in results]
    ax.bar(x, ssim, color="tab:red", alpha=0.8)
    ch = [_num(_get(r, "inversion", "chance_ssim")) for r in results]
    p95 = [_num(_get(r, "inversion", "chance_ssim_p95")) for r in results]
    if any(math.isfinite(c) for c in ch):
        ax.axhspan(np.nanmean(ch), np.nanmean(p95), color="0.8", alpha=0.6,
                   label="chance (typical patch: mean..95th pct)")
        ax.legend(fontsize=7)
    ax.set_title("Update inversion (small model): SSIM")
    ax.set_ylim(min(-0.1, np.nanmin(ssim + [0]) - 0.05), 1)

    ax = axes[1]
    w = 0.38
    for j, (key, label, colour) in enumerate((("federation_mia", "federation (SegResNet)", "tab:blue"),
                                              ("update_mia", "update (small model)", "tab:cyan"))):
        auc = np.array([_num(_get(r, key, "auc")) for r in results])
        lo = np.array([_num(_get(r, key, "ci_low")) for r in results])
        hi = np.array([_num(_get(r, key, "ci_high")) for r in results])
        err = np.vstack([np.where(np.isfinite(lo), auc - lo, 0), np.where(np.isfinite(hi), hi - auc, 0)])
        ax.bar(x + (j - 0.5) * w, auc, w, yerr=err, capsize=3, color=colour, alpha=0.85, label=label)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_title("Membership inference: AUC (95 % CI)")
    ax.legend(fontsize=7, loc="lower left")

    ax = axes[2]
    acc = [_num(_get(r, "property", "accuracy")) for r in results]
    pooled = [_num(_get(r, "property", "pooled_accuracy")) for r in results]
    ax.bar(x - 0.2, acc, 0.4, color="tab:green", alpha=0.85, label="per round")
    ax.bar(x + 0.2, pooled, 0.4, color="yellowgreen", alpha=0.85, label="pooled over rounds")
    ax.axhline(1.0 / n_sites, color="k", ls="--", lw=1, label=f"chance (1/{n_sites})")
    ax.set_ylim(0, 1.05)
    ax.set_title("Property inference: accuracy")
    ax.legend(fontsize=7)

    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "attack_success.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reconstructions(out: Path, results: list[dict]) -> Path:
    plt = _mpl()
    rows = []
    for r in results:
        f = out / r["configuration"] / "inversion.npz"
        if f.exists():
            with np.load(f) as z:
                rows.append((r, {k: np.array(z[k]) for k in z.files}))
    fig, axes = plt.subplots(max(1, len(rows)), 4, figsize=(8.5, 2.2 * max(1, len(rows))),
                             squeeze=False)
    for i, (r, z) in enumerate(rows):
        orig = z["original"][FLAIR]
        rec = z["reconstruction"][FLAIR]
        vmin, vmax = float(orig.min()), float(orig.max())
        panels = [(orig, "original (FLAIR)", dict(cmap="gray", vmin=vmin, vmax=vmax)),
                  (rec, "reconstruction", dict(cmap="gray", vmin=vmin, vmax=vmax)),
                  (z["original_label"][1] > 0.5, "tumour (WT)", dict(cmap="magma", vmin=0, vmax=1)),
                  (z["reconstruction_label"][1], "recovered WT", dict(cmap="magma", vmin=0, vmax=1))]
        for j, (img, title, kw) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(np.asarray(img, float).T, origin="lower", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        ss = _num(_get(r, "inversion", "per_target", r["sites"][0], "ssim"))
        axes[i, 0].set_ylabel(f"{r['configuration']}\nSSIM {ss:.2f}", fontsize=8)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no reconstructions", ha="center")
    fig.suptitle("site-1's patch and what the aggregator reconstructs from what it saw", fontsize=10)
    fig.tight_layout()
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(out: Path, results: list[dict], context: dict) -> list[Path]:
    """Write the three figures for ``results`` (configurations in report order) into ``out``."""
    ok = [r for r in results if r.get("status") == "ok"]
    return [privacy_utility(out, ok), attack_success(out, ok, len(context.get("sites", [])) or 3),
            reconstructions(out, ok)]
