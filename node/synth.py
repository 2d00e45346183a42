"""Synthetic BraTS-format data built on real anatomy from the ICBM152 2009a template.

The anatomy is the ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al., "Unbiased
average age-appropriate atlases for pediatric studies", NeuroImage 54(1):313-327, 2011; and
Fonov et al., NeuroImage 47:S102, 2009), which ships inside the nilearn wheel (T1 image, grey-
and white-matter probability maps, brain mask), so nothing is downloaded.  Template copyright
(C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University; redistributed by nilearn under its permissive licence.

Per case, :func:`synthesize`

1. warps the template tissue maps (GM, WM, CSF = mask - GM - WM) with a small random affine
   (scale, rotation, shift) onto a fixed isotropic ``spacing_mm`` grid cropped to the brain;
2. renders four contrasts (T1, T1ce, T2, FLAIR) from tissue mixtures with the usual relative
   intensities, plus the template T1's residual fine detail (deep grey nuclei etc.);
3. grows one irregular tumour (radii perturbed by smooth noise): necrotic core (label 1),
   enhancing rim (label 4 in the 2021 convention, 3 in 2023) and oedema (label 2) that spreads
   preferentially along white matter and never into CSF;
4. applies the site's scanner: anisotropic Gaussian blur (resolution), a smooth multiplicative
   polynomial bias field per contrast, a global gain, Gaussian noise, then skull-strips.

Sites are non-IID: each has its own tumour-size distribution, rim thickness (proportion of
enhancing tumour), oedema extent, preferred tumour location and enhancement strength.

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``seed`` (one stream
per site profile and one per case), so the same seed gives byte-identical arrays.

Layouts (see ARCHITECTURE.md section 6):

* ``labels="2021"`` (FeTS 2022):
  ``<out>/FeTS2022_00001/FeTS2022_00001_{t1,t1ce,t2,flair,seg}.nii.gz``, labels {0, 1, 2, 4};
* ``labels="2023"``: ``<out>/BraTS-GLI-00001-000/BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``,
  labels {0, 1, 2, 3};

plus ``<out>/partitioning_1.csv`` (``Subject_ID,Partition_ID``; site ``site-<Partition_ID>``) and
``<out>/synth.json`` (the parameters, used by :func:`matches` to reuse a cached dataset).
Images are int16 in arbitrary scanner units (no scaling), segmentations uint8; all five files of a
case share one RAS affine whose voxel size is ``spacing_mm``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedbrats.errors import ConfigError, FedbratsError

__all__ = ["SYNTH_VERSION", "SynthResult", "synthesize", "matches", "read_result"]

#: Bumped whenever the generated data change for the same parameters (invalidates caches).
SYNTH_VERSION = 1

_GENERATOR = "fedbrats.node.synth"
_MANIFEST = "synth.json"
_PARTITION_CSV = "partitioning_1.csv"
_MAX_CASES = 99_999  # IDs carry five digits
_MARGIN_MM = 8.0  # crop margin around the template brain; holds the per-case warp
_TUMOUR_TRIES = 20


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote.

    Attributes:
        out_dir: The dataset root.
        case_ids: Site id (``"site-1"`` ...) -> case ids of that site, in write order.
        partitioning_csv: Path of the FeTS-style ``partitioning_1.csv``
            (columns ``Subject_ID,Partition_ID``).
    """

    out_dir: Path
    case_ids: dict[str, list[str]]
    partitioning_csv: Path


@dataclass(frozen=True)
class _Convention:
    """File naming and label values of one BraTS release."""

    id_prefix: str
    id_suffix: str
    sep: str
    modalities: tuple[str, str, str, str]  # in the order t1, t1ce, t2, flair
    et_label: int

    def case_id(self, number: int) -> str:
        return f"{self.id_prefix}{number:05d}{self.id_suffix}"

    def file_names(self, case_id: str) -> list[str]:
        return [f"{case_id}{self.sep}{m}.nii.gz" for m in (*self.modalities, "seg")]


_CONVENTIONS = {
    "2021": _Convention("FeTS2022_", "", "_", ("t1", "t1ce", "t2", "flair"), 4),
    "2023": _Convention("BraTS-GLI-", "-000", "-", ("t1n", "t1c", "t2w", "t2f"), 3),
}

# Relative intensities (WM in T1 ~ 0.9) per contrast t1, t1ce, t2, flair.
# Columns: CSF, GM, WM, oedema, enhancing tumour, necrosis.
_INTENSITY = np.array(
    [
        [0.30, 0.62, 0.88, 0.50, 0.58, 0.22],  # T1: CSF dark, WM bright, tumour hypo-intense
        [0.30, 0.62, 0.88, 0.52, 1.50, 0.20],  # T1ce: enhancing rim very bright, necrosis dark
        [1.00, 0.60, 0.42, 0.86, 0.64, 1.05],  # T2: CSF, oedema and necrosis bright
        [0.12, 0.62, 0.48, 1.05, 0.80, 0.40],  # FLAIR: CSF suppressed, oedema brightest
    ],
    dtype=np.float32,
)
# How much of the template T1's residual fine detail (beyond the tissue mixture) each contrast
# inherits; T2-weighted contrasts invert it.
_RESIDUAL_GAIN = np.array([1.0, 1.0, -1.2, -0.6], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# argument handling and the output directory
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(out_dir: object, sites: object, cases_per_site: object, seed: object,
              labels: object, spacing_mm: object, progress: object) -> None:
    problems: list[str] = []
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        problems.append(f"out_dir must be a non-empty path, got {out_dir!r}")
    if not _is_int(sites) or sites < 1:  # type: ignore[operator]
        problems.append(f"sites must be an integer >= 1, got {sites!r}")
    if not _is_int(cases_per_site) or cases_per_site < 1:  # type: ignore[operator]
        problems.append(f"cases_per_site must be an integer >= 1, got {cases_per_site!r}")
    if (_is_int(sites) and _is_int(cases_per_site) and sites >= 1 and cases_per_site >= 1
            and sites * cases_per_site > _MAX_CASES):  # type: ignore[operator]
        problems.append(f"sites * cases_per_site must be <= {_MAX_CASES} (five-digit case ids), "
                        f"got {sites * cases_per_site}")  # type: ignore[operator]
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(labels, str) or labels not in _CONVENTIONS:
        problems.append(f"labels must be one of {sorted(_CONVENTIONS)}, got {labels!r}")
    if (not isinstance(spacing_mm, numbers.Real) or isinstance(spacing_mm, bool)
            or not math.isfinite(spacing_mm)  # type: ignore[arg-type]
            or not 0.5 <= spacing_mm <= 4.0):  # type: ignore[operator]
        problems.append(f"spacing_mm must be a number in [0.5, 4] mm, got {spacing_mm!r}")
    if progress is not None and not callable(progress):
        problems.append(f"progress must be callable or None, got {type(progress).__name__}")
    if problems:
        raise ConfigError("data synth", problems)


def _read_manifest(out_dir: Path) -> dict | None:
    """The synth manifest of ``out_dir``, or None when absent or not ours."""
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != _GENERATOR:
        return None
    case_ids = manifest.get("case_ids")
    if not isinstance(case_ids, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in case_ids.values()
    ):
        return None
    if manifest.get("labels") not in _CONVENTIONS:
        return None
    return manifest


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or clear a previous synth output in it; refuse anything else.

    Only files a previous run recorded in its manifest are removed; any other entry makes the
    directory foreign and nothing is deleted.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FedbratsError(f"synthetic data output {out_dir} exists and is not a directory")
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise FedbratsError(
            f"refusing to write synthetic data into {out_dir}: the directory is not empty and "
            f"is not a previous synth output (no valid {_MANIFEST}); choose an empty directory"
        )
    conv = _CONVENTIONS[manifest["labels"]]
    ours: dict[str, list[str]] = {
        cid: conv.file_names(cid) for ids in manifest["case_ids"].values() for cid in ids
    }
    foreign: list[str] = []
    for name in entries:
        path = out_dir / name
        if name in (_MANIFEST, _PARTITION_CSV) and path.is_file() and not path.is_symlink():
            continue
        if name in ours and path.is_dir() and not path.is_symlink():
            foreign += [str(path / f) for f in sorted(os.listdir(path)) if f not in ours[name]]
            continue
        foreign.append(str(path))
    if foreign:
        raise FedbratsError(
            f"refusing to write synthetic data into {out_dir}: it holds a previous synth output "
            f"but also entries synth did not write: {', '.join(foreign)}"
        )
    # Manifest first: an interrupted clean-up leaves a directory that is still recognised.
    for name in entries:
        path = out_dir / name
        if name in ours:
            for f in ours[name]:
                (path / f).unlink(missing_ok=True)
            path.rmdir()
    (out_dir / _PARTITION_CSV).unlink(missing_ok=True)
    (out_dir / _MANIFEST).unlink(missing_ok=True)


def _write_manifest(out_dir: Path, params: dict, case_ids: dict[str, list[str]],
                    shape: tuple[int, ...], complete: bool) -> None:
    manifest = {
        "generator": _GENERATOR,
        **params,
        "complete": complete,
        "shape": list(shape),
        "partitioning_csv": _PARTITION_CSV,
        "case_ids": case_ids,
    }
    tmp = out_dir / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / _MANIFEST)


def _params(sites: int, cases_per_site: int, seed: int, labels: str, spacing_mm: float) -> dict:
    return {
        "version": SYNTH_VERSION,
        "seed": int(seed),
        "sites": int(sites),
        "cases_per_site": int(cases_per_site),
        "labels": labels,
        "spacing_mm": float(spacing_mm),
    }


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Template maps at 1 mm (anti-aliased for the target spacing) and the output grid."""

    maps: np.ndarray  # (4, X, Y, Z) float32: GM, WM, brain mask, T1 residual
    template_affine: np.ndarray  # 4x4, voxel -> world mm (RAS)
    centre_mm: np.ndarray  # brain centroid, world mm
    shape: tuple[int, int, int]  # output grid
    affine: np.ndarray  # 4x4 output grid voxel -> world mm (RAS), voxel size = spacing


@functools.lru_cache(maxsize=2)
def _anatomy(spacing_mm: float) -> _Anatomy:
    from nilearn import datasets  # imported lazily: nilearn is slow to import

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = t1_img.get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    mask = mask.astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # Fine detail the tissue mixture does not explain (deep nuclei, cortical ribbon contrast).
    inside = mask > 0
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, t1[inside].astype(np.float64), rcond=None)
    fitted = gm * coef[0] + wm * coef[1] + csf * coef[2]
    residual = np.where(inside, t1 - fitted.astype(np.float32), 0.0).astype(np.float32)
    residual *= np.float32(0.88 / coef[1])  # to the units of _INTENSITY (WM in T1 = 0.88)

    maps = np.stack([gm, wm, mask, residual])
    # Anti-aliasing before sampling at a coarser spacing (template voxels are 1 mm).
    sigma = 0.45 * math.sqrt(max(spacing_mm**2 - 1.0, 0.0))
    if sigma > 0.05:
        for i in range(len(maps)):
            maps[i] = ndimage.gaussian_filter(maps[i], sigma, mode="constant")

    idx = np.argwhere(inside)
    vox_lo, vox_hi = idx.min(axis=0), idx.max(axis=0)
    world = lambda v: affine[:3, :3] @ v + affine[:3, 3]  # noqa: E731
    corners = np.array([world(vox_lo), world(vox_hi)])
    lo, hi = corners.min(axis=0) - _MARGIN_MM, corners.max(axis=0) + _MARGIN_MM
    fov = np.array([world(np.zeros(3)), world(np.array(t1.shape) - 1.0)])
    lo = np.maximum(lo, fov.min(axis=0))  # nothing exists beyond the template's field of view
    hi = np.minimum(hi, fov.max(axis=0))
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing_mm).astype(int) + 1)
    out_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_affine[:3, 3] = lo
    centre = world(idx.mean(axis=0))
    return _Anatomy(maps, affine, centre, shape, out_affine)  # type: ignore[arg-type]


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warped_anatomy(anat: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Template maps under a small random affine, sampled on the output grid: (4, *shape)."""
    scale = rng.uniform(0.94, 1.06, size=3)
    rot = _rotation(np.deg2rad(rng.normal(0.0, 3.0, size=3)))
    shift = rng.uniform(-3.0, 3.0, size=3)
    forward = rot @ np.diag(scale)  # template world -> case world, about the brain centre
    inverse = np.linalg.inv(forward)
    c = anat.centre_mm
    t_inv = np.linalg.inv(anat.template_affine)
    # output voxel j -> world y = A j + a -> template world x = c + inv (y - c - shift)
    # -> template voxel T^-1 x
    matrix = t_inv[:3, :3] @ inverse @ anat.affine[:3, :3]
    offset = t_inv[:3, :3] @ (c + inverse @ (anat.affine[:3, 3] - c - shift)) + t_inv[:3, 3]
    out = np.empty((len(anat.maps), *anat.shape), dtype=np.float32)
    for i, m in enumerate(anat.maps):
        ndimage.affine_transform(m, matrix, offset=offset, output_shape=anat.shape,
                                 output=out[i], order=1, mode="constant", cval=0.0)
    return out


# --------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """One site's case mix and scanner."""

    radius_mm: float  # mean outer radius of the enhancing tumour
    rim_mm: float  # mean enhancing-rim thickness
    oedema_mm: float  # mean oedema margin beyond the enhancing tumour
    location: np.ndarray  # unit vector of the preferred tumour location (RAS)
    location_weight: float
    enhancement: float  # multiplies the T1ce enhancement of the rim
    gain: np.ndarray  # (4,) global scanner gain per contrast
    bias: np.ndarray  # (4, *shape) float32 multiplicative bias field per contrast
    noise: float  # Gaussian noise sigma as a fraction of the gain
    blur_mm: np.ndarray  # (3,) Gaussian PSF sigma per axis


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _site(seed: int, index: int, shape: tuple[int, int, int]) -> _Site:
    rng = _stream(seed, 0, index)
    location = rng.normal(size=3)
    location /= np.linalg.norm(location)
    # Anisotropic resolution: one "slice" axis is blurrier than the in-plane ones.
    blur = rng.uniform(0.0, 0.8, size=3)
    blur[rng.integers(3)] = rng.uniform(0.6, 1.8)

    # Smooth multiplicative bias: exp(quadratic polynomial) over the grid, shared site part plus
    # a per-contrast part (coils differ by sequence).
    grids = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*grids, indexing="ij", sparse=True)
    terms = [x, y, z, x * x - 0.33, y * y - 0.33, z * z - 0.33, x * y, x * z, y * z]
    amplitude = rng.uniform(0.06, 0.16)
    shared = rng.normal(0.0, amplitude, size=len(terms))
    bias = np.empty((4, *shape), dtype=np.float32)
    for k in range(4):
        coef = shared + rng.normal(0.0, amplitude * 0.5, size=len(terms))
        log_field = sum(np.float32(c) * t for c, t in zip(coef, terms))
        bias[k] = np.exp(log_field, dtype=np.float32)

    return _Site(
        radius_mm=float(rng.uniform(13.0, 21.0)),
        rim_mm=float(rng.uniform(6.0, 9.0)),
        oedema_mm=float(rng.uniform(5.0, 14.0)),
        location=location,
        location_weight=float(rng.uniform(0.0, 3.0)),
        enhancement=float(rng.uniform(0.8, 1.15)),
        gain=rng.uniform(600.0, 1600.0, size=4),
        bias=bias,
        noise=float(rng.uniform(0.015, 0.05)),
        blur_mm=blur,
    )


# --------------------------------------------------------------------------------------------
# tumours
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field smoothed with ``sigma_vox`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                                    max(sigma_vox, 0.5), mode="reflect")
    std = float(field.std())
    return field / np.float32(std if std > 0 else 1.0)


@dataclass(frozen=True)
class _Tumour:
    box: tuple[slice, slice, slice]
    enhancing: np.ndarray  # (box) soft membership of the enhancing + necrotic core
    necrosis: np.ndarray  # (box) soft membership of the necrotic core
    oedema: np.ndarray  # (box) soft membership of the whole tumour (oedema and core)
    texture: np.ndarray  # (box) multiplicative heterogeneity
    enhancement: float


def _tumour(anatomy: np.ndarray, site: _Site, anat: _Anatomy, spacing: float,
            rng: np.random.Generator) -> _Tumour:
    """Draw one tumour; its memberships are > 0.5 exactly where the labels go."""
    gm, wm, mask = anatomy[0], anatomy[1], anatomy[2]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    brain = mask > 0.5

    rim = max(float(rng.normal(site.rim_mm, 1.0)), 6.0, 2.25 * spacing)  # >= 3 voxels at 2 mm
    min_radius = max(10.0, rim + max(5.0, 2.0 * spacing))  # necrotic core >= 5 mm radius
    radius = float(np.clip(rng.normal(site.radius_mm, 3.0), min_radius, max(25.0, min_radius)))
    margin = float(np.clip(rng.normal(site.oedema_mm, 3.0), max(4.0, 2.0 * spacing), 16.0))

    # Centre: deep enough for the core, in parenchyma (not the ventricles), supratentorial
    # where possible, weighted towards the site's preferred region.
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    world = np.moveaxis(np.indices(anat.shape, dtype=np.float32), 0, -1) @ \
        anat.affine[:3, :3].T.astype(np.float32) + anat.affine[:3, 3].astype(np.float32)
    parenchyma = brain & (csf < 0.3)
    candidates = parenchyma & (depth >= radius + 3.0)
    if not candidates.any():
        radius = max(float(depth.max()) - 3.0, min_radius)
        candidates = parenchyma & (depth >= float(depth.max()) - spacing)
    supratentorial = candidates & (world[..., 2] > -15.0)
    if supratentorial.any():
        candidates = supratentorial
    idx = np.argwhere(candidates)
    rel = (world[candidates] - anat.centre_mm.astype(np.float32)) / np.float32(50.0)
    logits = site.location_weight * (rel @ site.location.astype(np.float32))
    weights = np.exp(logits - logits.max()).astype(np.float64)
    centre = idx[rng.choice(len(idx), p=weights / weights.sum())]

    # Largest possible extent of the radii below (clipped noise), so the box never cuts a label.
    reach = radius * 1.7 + margin * 1.3 * 2.1 + 2.0 * spacing
    half = int(math.ceil(reach / spacing))
    box = tuple(slice(max(int(c) - half, 0), min(int(c) + half + 1, n))
                for c, n in zip(centre, anat.shape))
    bshape = tuple(s.stop - s.start for s in box)
    offsets = [np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c)
               for s, c in zip(box, centre)]
    gx, gy, gz = np.meshgrid(*offsets, indexing="ij", sparse=True)
    dist_vox = np.sqrt(gx * gx + gy * gy + gz * gz)
    dist = dist_vox * np.float32(spacing)  # mm from the centre

    # The core's radii depend on direction only (a star-shaped blob), so the rim keeps its
    # thickness along every ray: smooth 3D noise sampled on a sphere of radius rho voxels.
    rho = radius / spacing
    side = 2 * int(math.ceil(rho)) + 5
    lobes = _smooth_noise(rng, (side,) * 3, rho / 2.0)
    bumps = _smooth_noise(rng, (side,) * 3, rho / 4.0)
    rim_var = _smooth_noise(rng, (side,) * 3, rho / 2.5)
    fingers = _smooth_noise(rng, bshape, max(margin, radius) / (2.5 * spacing))
    texture = _smooth_noise(rng, bshape, 1.5 / spacing + 0.5)
    irregularity = float(rng.uniform(0.12, 0.28))

    scale = np.float32(rho) / np.maximum(dist_vox, np.float32(1e-6))
    on_sphere = [np.broadcast_to(np.float32((side - 1) / 2) + g * scale, bshape)
                 for g in (gx, gy, gz)]

    outline = np.clip(lobes, -1.6, 1.6) + 0.4 * np.clip(bumps, -2.0, 2.0)
    r_enh = radius * (1.0 + irregularity * ndimage.map_coordinates(
        outline, on_sphere, order=1, mode="nearest"))
    # The necrotic boundary matters only within the core's largest extent.
    core = dist_vox <= np.float32(1.7 * rho + 1.0)
    rim_here = ndimage.map_coordinates(np.clip(rim_var, -1.5, 1.5),
                                       [c[core] for c in on_sphere], order=1, mode="nearest")
    r_nec = np.full(bshape, -1.0e3, dtype=np.float32)
    r_nec[core] = r_enh[core] - rim * (1.0 + 0.15 * rim_here)
    wm_box = wm[box]
    r_oed = r_enh + margin * (0.4 + 0.9 * wm_box) * (1.0 + 0.6 * np.clip(fingers, -1.3, 1.8))

    def membership(r: np.ndarray) -> np.ndarray:  # partial volume over one voxel
        return np.clip(0.5 + (r - dist) / np.float32(spacing), 0.0, 1.0).astype(np.float32)

    inside = brain[box]
    enhancing = membership(r_enh) * inside
    necrosis = membership(r_nec) * inside
    # Oedema infiltrates parenchyma only, never CSF spaces.
    oedema = membership(r_oed) * inside * (csf[box] < 0.5)
    # Keep only oedema connected to the core (no detached islands), with its partial-volume edge.
    parts, _ = ndimage.label(oedema > 0.5)
    attached = np.unique(parts[(enhancing > 0.5) & (parts > 0)])
    keep = ndimage.binary_dilation(np.isin(parts, attached))
    oedema = np.maximum(oedema * keep, enhancing)
    return _Tumour(
        box=box,  # type: ignore[arg-type]
        enhancing=enhancing,
        necrosis=necrosis,
        oedema=oedema,
        texture=(1.0 + 0.07 * np.clip(texture, -3, 3)).astype(np.float32),
        enhancement=site.enhancement * float(rng.uniform(0.85, 1.15)),
    )


def _segmentation(tumour: _Tumour, shape: tuple[int, int, int], et_label: int) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    sub = np.zeros(tumour.oedema.shape, dtype=np.uint8)
    sub[tumour.oedema > 0.5] = 2
    sub[tumour.enhancing > 0.5] = et_label
    sub[tumour.necrosis > 0.5] = 1
    seg[tumour.box] = sub
    return seg


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _render(anatomy: np.ndarray, tumour: _Tumour, site: _Site, spacing: float,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Four int16 contrasts (t1, t1ce, t2, flair) in scanner units; exactly 0 outside the brain."""
    gm, wm, mask, residual = anatomy
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    brain = mask > 0.5
    blur = site.blur_mm / spacing
    images = []
    for k in range(4):
        mu = _INTENSITY[k]
        img = csf * mu[0] + gm * mu[1] + wm * mu[2] + _RESIDUAL_GAIN[k] * residual
        # Tumour compartments: oedema mixes into tissue, the core replaces it.
        mu_enh = mu[4] if k != 1 else mu[2] + (mu[4] - mu[2]) * tumour.enhancement
        core = mu_enh * (1.0 - tumour.necrosis) + mu[5] * tumour.necrosis
        sub = img[tumour.box]
        sub = sub * (1.0 - tumour.oedema) + mu[3] * tumour.oedema
        sub = sub * (1.0 - tumour.enhancing) + core * tumour.enhancing
        weight = tumour.oedema
        img[tumour.box] = sub * (1.0 + (tumour.texture - 1.0) * weight)
        if np.any(blur > 0.05):
            img = ndimage.gaussian_filter(img, blur, mode="constant")
        img = img * site.bias[k] * np.float32(site.gain[k])
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
            site.noise * site.gain[k])
        # Brain voxels stay >= 1 so that every contrast has the same non-zero (brain) mask.
        img = np.where(brain, np.clip(img, 1.0, 32000.0), 0.0)
        images.append(np.rint(img).astype(np.int16))
    return images


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(data.dtype)
    nib.save(img, path)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def synthesize(
    out_dir: Path,
    *,
    sites: int,
    cases_per_site: int,
    seed: int,
    labels: str = "2021",
    spacing_mm: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> SynthResult:
    """Write a synthetic BraTS-format dataset with per-site scanners and non-IID tumours.

    Anatomy comes from the ICBM152 2009a nonlinear symmetric template shipped in the nilearn
    wheel (Fonov et al., NeuroImage 54(1):313-327, 2011); nothing is downloaded.  Each case is
    the template under a small random affine, four contrasts rendered from GM/WM/CSF mixtures,
    one irregular tumour (necrotic core, enhancing rim of ~6-9 mm, oedema), and the
    site's blur, bias field, gain and noise.  Tumour outer radii are 10-25 mm.

    Args:
        out_dir: Dataset root.  Created if missing; must be empty or hold a previous synth output
            (which is replaced; only files it recorded are deleted).
        sites: Number of sites (partitions), >= 1.
        cases_per_site: Cases written per site, >= 1.
        seed: Non-negative integer; the same seed and parameters give byte-identical arrays.
        labels: ``"2021"`` for FeTS 2022 naming and labels {0,1,2,4}; ``"2023"`` for BraTS 2023
            naming (``-t1n/-t1c/-t2w/-t2f/-seg``) and labels {0,1,2,3}.
        spacing_mm: Isotropic voxel size in mm, in [0.5, 4].  At 2 mm volumes are ~81x99x82.
        progress: Called with a short message after each case is written.

    Returns:
        A :class:`SynthResult` naming the cases of each site (``site-1`` ...) and the
        partitioning CSV.

    Raises:
        ConfigError: One or more arguments are invalid (all are listed at once).
        FedbratsError: ``out_dir`` is not a directory, or is non-empty and not a previous synth
            output.
    """
    _validate(out_dir, sites, cases_per_site, seed, labels, spacing_mm, progress)
    out_dir = Path(out_dir)
    spacing = float(spacing_mm)
    conv = _CONVENTIONS[labels]
    params = _params(sites, cases_per_site, seed, labels, spacing)
    case_ids = {
        f"site-{s + 1}": [conv.case_id(s * cases_per_site + i + 1) for i in range(cases_per_site)]
        for s in range(sites)
    }

    _prepare_out_dir(out_dir)
    anat = _anatomy(spacing)
    # Recorded before any case is written, so an interrupted run can be cleaned by the next one.
    _write_manifest(out_dir, params, case_ids, anat.shape, complete=False)

    for s, (site_id, ids) in enumerate(case_ids.items()):
        site = _site(seed, s, anat.shape)
        for i, cid in enumerate(ids):
            rng = _stream(seed, 1, s, i)
            for _ in range(_TUMOUR_TRIES):
                anatomy = _warped_anatomy(anat, rng)
                tumour = _tumour(anatomy, site, anat, spacing, rng)
                seg = _segmentation(tumour, anat.shape, conv.et_label)
                present = np.bincount(seg.ravel(), minlength=5)
                if all(present[v] > 0 for v in (1, 2, conv.et_label)):
                    break
            else:  # pragma: no cover - geometry makes this practically impossible
                raise FedbratsError(f"could not place a complete tumour for case {cid}")
            images = _render(anatomy, tumour, site, spacing, rng)
            case_dir = out_dir / cid
            case_dir.mkdir()
            for name, data in zip(conv.file_names(cid), (*images, seg)):
                _write_nifti(case_dir / name, data, anat.affine)
            if progress is not None:
                progress(f"{site_id}: case {i + 1}/{len(ids)} written ({cid})")

    csv_path = out_dir / _PARTITION_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Subject_ID", "Partition_ID"])
        for s, ids in enumerate(case_ids.values()):
            writer.writerows([cid, s + 1] for cid in ids)
    _write_manifest(out_dir, params, case_ids, anat.shape, complete=True)
    return SynthResult(out_dir=out_dir, case_ids=case_ids, partitioning_csv=csv_path)


def matches(
    out_dir: Path,
    *,
    sites: int,
    cases_per_site: int,
    seed: int,
    labels: str = "2021",
    spacing_mm: float = 2.0,
) -> bool:
    """Whether ``out_dir`` holds a complete synth output made with exactly these parameters.

    Use it to reuse a cached dataset instead of calling :func:`synthesize` again.  Never raises
    for a missing or foreign directory; it simply answers False.

    Args:
        out_dir: Candidate dataset root.
        sites: As for :func:`synthesize`.
        cases_per_site: As for :func:`synthesize`.
        seed: As for :func:`synthesize`.
        labels: As for :func:`synthesize`.
        spacing_mm: As for :func:`synthesize`, in mm.

    Returns:
        True when ``synth.json`` records these parameters and :data:`SYNTH_VERSION`, the run
        completed, and every case file and the partitioning CSV exist.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.get("complete") is not True:
        return False
    try:
        wanted = _params(sites, cases_per_site, seed, labels, spacing_mm)
    except (TypeError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in wanted.items()):
        return False
    conv = _CONVENTIONS[manifest["labels"]]
    if not (out_dir / _PARTITION_CSV).is_file():
        return False
    return all(
        (out_dir / cid / f).is_file()
        for ids in manifest["case_ids"].values() for cid in ids for f in conv.file_names(cid)
    )


def read_result(out_dir: Path) -> SynthResult:
    """The :class:`SynthResult` of a complete synth output already on disk (e.g. a cache hit).

    Args:
        out_dir: Dataset root written by :func:`synthesize`.

    Returns:
        The same result :func:`synthesize` returned when it wrote ``out_dir``.

    Raises:
        FedbratsError: ``out_dir`` holds no complete synth output.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.get("complete") is not True:
        raise FedbratsError(f"{out_dir} holds no complete synthetic dataset ({_MANIFEST})")
    return SynthResult(
        out_dir=out_dir,
        case_ids={k: list(v) for k, v in manifest["case_ids"].items()},
        partitioning_csv=out_dir / _PARTITION_CSV,
    )
