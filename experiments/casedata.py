"""The cases the attacks are scored on: members, non-members, the attacker's own data.

For a federation on synthetic data (``data.root`` empty) :func:`prepare` synthesises, from the
federation's own seed and spacing, a dataset with one more site and more cases per site
(:func:`node.synth.synthesize` draws every case from its own ``(seed, site, case)`` stream, so the
first ``cases_per_site`` cases of each site are byte-identical to the federation's; this is
checked).  That gives, per site k:

* **members**: k's training cases (the split the node itself makes, ``data.split_cases``);
* **non-members from k's own distribution**: k's validation cases and *fresh* cases drawn from
  k's site profile (same scanner, same tumour statistics) that nobody trained on;
* and, for everyone, a **held-out site** (another scanner): the attacker's auxiliary data for
  property inference, and an extra non-member set for membership inference.

On real data (``data.root`` set) only the validation cases are non-members and there is no
auxiliary data (property inference is then not run).

Each case is prepared once: z-scored channels (over non-zero voxels, as the training pipeline),
TC/WT/ET regions, a tumour-centred 3D crop of ``training.patch_size`` (for losses and
predictions of the federated SegResNet), and 2D axial patches through the tumour (for the
small-model studies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbrats.config import Config
from fedbrats.errors import FedbratsError

#: Axial offsets (voxels) from the tumour's largest slice of the 2D patches of the update-level
#: membership study; the inversion target is the slice itself (offset 0).
MIA_SLICE_OFFSETS = (-2, 2)


@dataclass
class CaseView:
    """One case, prepared for the attacks.

    Attributes:
        case_id, site: the case and the site whose profile it was drawn from.
        role: ``train`` (member), ``val``, ``fresh`` (same site, never used) or ``heldout``.
        crop_image, crop_label: tumour-centred ``(4, *patch)`` z-scored crop and ``(3, *patch)``
            regions (TC, WT, ET).
        wt_voxels, et_voxels: whole-tumour and enhancing-tumour volume of the case, voxels.
        patch: the 2D axial ``(4, P, P)`` patch through the tumour's largest slice, and
            ``patch_label`` its ``(3, P, P)`` regions.
        mia_patches: further 2D patches (``MIA_SLICE_OFFSETS``), each ``(image, label)``.
    """

    case_id: str
    site: str
    role: str
    crop_image: np.ndarray
    crop_label: np.ndarray
    wt_voxels: float
    et_voxels: float
    patch: np.ndarray
    patch_label: np.ndarray
    mia_patches: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class AttackData:
    """Everything the attacks are scored against (ground truth the attacker does not have).

    Attributes:
        sites: the federation's sites, in order.
        train, val, fresh: per site, its members / validation cases / fresh same-profile cases.
        heldout: cases of a site outside the federation (the attacker's auxiliary data).
        weights: per site, its FedAvg weight (training cases).
        truth: per property (``wt``, ``et``), per site, the mean volume over its training cases.
        source: where the extra cases came from (for the report).
    """

    sites: list[str]
    train: dict[str, list[CaseView]]
    val: dict[str, list[CaseView]]
    fresh: dict[str, list[CaseView]]
    heldout: list[CaseView]
    weights: dict[str, int]
    truth: dict[str, dict[str, float]]
    source: str

    def largest(self, prop: str) -> str:
        """The site with the largest mean ``prop`` (``wt`` or ``et``) over its training cases."""
        t = self.truth[prop]
        return max(t, key=lambda s: t[s])

    def margin(self, prop: str) -> float:
        """Relative gap between the largest and the second-largest site mean of ``prop``."""
        v = sorted(self.truth[prop].values(), reverse=True)
        return (v[0] - v[1]) / v[0] if len(v) > 1 and v[0] > 0 else float("nan")


def _zscore(img: np.ndarray) -> np.ndarray:
    out = np.array(img, np.float32, copy=True)
    for c in range(out.shape[0]):
        m = out[c] != 0
        if m.any():
            v = out[c][m]
            out[c][m] = (v - v.mean()) / (v.std() + 1e-8)
    return out


def _window(centre: int, size: int, length: int) -> slice:
    lo = min(max(int(centre) - size // 2, 0), max(length - size, 0))
    return slice(lo, lo + size)


def _pad_to(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    pads = [(0, 0)] + [(0, max(0, s - n)) for s, n in zip(shape, a.shape[1:])]
    return np.pad(a, pads) if any(p[1] for p in pads) else a


def view_case(case, role: str, *, labels: str, patch_size: Sequence[int], patch2d: int) -> CaseView:
    """Load and prepare one :class:`node.data.Case` (see :class:`CaseView`)."""
    from node import data as nd

    sample = nd.load_case(case)
    if sample.get("label") is None:
        raise FedbratsError(f"case {case.case_id}: the attacks need its segmentation")
    img = _zscore(sample["image"])
    lab = nd.labels_to_regions(sample["label"], labels=labels).astype(np.float32)
    img = _pad_to(img, patch_size)
    lab = _pad_to(lab, patch_size)
    wt = lab[1] > 0
    if not wt.any():
        raise FedbratsError(f"case {case.case_id}: no tumour in its segmentation")
    centre = np.array(np.nonzero(wt)).mean(axis=1).round().astype(int)
    sl = tuple(_window(c, s, n) for c, s, n in zip(centre, patch_size, wt.shape))
    crop_img = img[(slice(None), *sl)]
    crop_lab = lab[(slice(None), *sl)]

    area = wt.sum(axis=(0, 1))
    cz = int(np.argmax(area))
    img2 = _pad_to(img, (patch2d, patch2d, img.shape[3]))
    lab2 = _pad_to(lab, (patch2d, patch2d, lab.shape[3]))

    def patch_at(z: int) -> tuple[np.ndarray, np.ndarray]:
        z = int(np.clip(z, 0, wt.shape[2] - 1))
        m = lab2[1, :, :, z] > 0
        if not m.any():
            m = lab2[1, :, :, cz] > 0
        xs, ys = np.nonzero(m)
        sx = _window(int(round(xs.mean())), patch2d, m.shape[0])
        sy = _window(int(round(ys.mean())), patch2d, m.shape[1])
        return (np.ascontiguousarray(img2[:, sx, sy, z]), np.ascontiguousarray(lab2[:, sx, sy, z]))

    p_img, p_lab = patch_at(cz)
    return CaseView(case_id=case.case_id, site=case.site_id, role=role,
                    crop_image=np.ascontiguousarray(crop_img), crop_label=np.ascontiguousarray(crop_lab),
                    wt_voxels=float(wt.sum()), et_voxels=float((lab[2] > 0).sum()),
                    patch=p_img, patch_label=p_lab,
                    mia_patches=[patch_at(cz + o) for o in MIA_SLICE_OFFSETS])


def attack_data_dir(cfg: Config, extra_cases: int) -> Path:
    """Cache folder of the extended synthetic dataset (one more site, ``extra_cases`` more per site)."""
    s = cfg.data.synth
    name = (f"attack-sites{cfg.federation.sites + 1}-cases{s.cases_per_site + extra_cases}-"
            f"sp{s.spacing_mm:g}mm-seed{cfg.federation.seed}-labels{cfg.data.labels}")
    return Path(s.cache_dir).expanduser() / name


def _extended_synth(cfg: Config, extra_cases: int, progress) -> Path:
    import os
    import shutil

    from node import synth

    target = attack_data_dir(cfg, extra_cases)
    params = dict(sites=cfg.federation.sites + 1,
                  cases_per_site=cfg.data.synth.cases_per_site + extra_cases,
                  seed=cfg.federation.seed, labels=cfg.data.labels,
                  spacing_mm=cfg.data.synth.spacing_mm)
    if target.exists() and synth.matches(target, **params):
        progress(f"attack data: reusing {target}")
        return target
    if target.exists():
        shutil.rmtree(target)
    progress(f"attack data: synthesising {params['sites']} site(s) x {params['cases_per_site']} "
             f"case(s) (the federation's cases, {extra_cases} fresh case(s) per site and a "
             f"held-out site) into {target}")
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    synth.synthesize(tmp, progress=None, **params)
    os.replace(tmp, target)
    return target


def prepare(cfg: Config, fed_root: Path, *, extra_cases: int, heldout_cases: int, patch2d: int,
            progress=print) -> AttackData:
    """Build the :class:`AttackData` of a federation whose dataset is ``fed_root``.

    Raises:
        FedbratsError: the extended synthetic data do not reproduce the federation's cases, or a
            site has no training case.
    """
    from node import data as nd

    part = Path(cfg.data.partitioning).expanduser() if cfg.data.partitioning else None
    fed_sites = nd.discover_sites(fed_root, partitioning=part)
    sites = [f"site-{i}" for i in range(1, cfg.federation.sites + 1)]
    missing = [s for s in sites if s not in fed_sites]
    if missing:
        raise FedbratsError(f"attack data: no cases for {', '.join(missing)} under {fed_root}")
    kw = dict(labels=cfg.data.labels, patch_size=tuple(cfg.training.patch_size), patch2d=patch2d)
    train: dict[str, list[CaseView]] = {}
    val: dict[str, list[CaseView]] = {}
    fresh: dict[str, list[CaseView]] = {s: [] for s in sites}
    heldout: list[CaseView] = []
    for s in sites:
        tr, va = nd.split_cases(fed_sites[s], val_fraction=cfg.data.val_fraction,
                                seed=cfg.federation.seed)
        if not tr:
            raise FedbratsError(f"attack data: site {s} has no training case")
        train[s] = [view_case(c, "train", **kw) for c in tr]
        val[s] = [view_case(c, "val", **kw) for c in va]
    source = "the federation's validation cases only (real data: no fresh or held-out cases)"
    if not cfg.data.root and (extra_cases > 0 or heldout_cases > 0):
        root = _extended_synth(cfg, max(extra_cases, 0), progress)
        ext = nd.discover_sites(root)
        n_fed = cfg.data.synth.cases_per_site
        for s in sites:
            # Same (seed, site, case) streams: the first n_fed cases must be the federation's.
            a = nd.load_case(ext[s][0])["label"]
            b = nd.load_case(fed_sites[s][0])["label"]
            if a.shape != b.shape or not np.array_equal(a, b):
                raise FedbratsError(f"attack data: {root} does not reproduce {s}'s cases; delete "
                                    f"it and run again")
            fresh[s] = [view_case(c, "fresh", **kw) for c in ext[s][n_fed:n_fed + extra_cases]]
        extra_site = f"site-{cfg.federation.sites + 1}"
        heldout = [view_case(c, "heldout", **kw) for c in ext[extra_site][:heldout_cases]]
        source = (f"{extra_cases} fresh case(s) per site from the site's own profile and "
                  f"{len(heldout)} case(s) of a held-out site, synthesised from the same seed "
                  f"({root})")
    weights = {s: len(train[s]) for s in sites}
    truth = {"wt": {s: float(np.mean([c.wt_voxels for c in train[s]])) for s in sites},
             "et": {s: float(np.mean([c.et_voxels for c in train[s]])) for s in sites}}
    return AttackData(sites=sites, train=train, val=val, fresh=fresh, heldout=heldout,
                      weights=weights, truth=truth, source=source)
