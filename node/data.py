"""BraTS data for a site node: discovery, preflight, loading and MONAI transforms.

The pipeline is::

    sites = discover_sites(root)                      # {site_id: [Case, ...]}
    preflight(sites[my_site], labels="2021")          # one DataError listing every problem
    train, val = split_cases(sites[my_site], val_fraction=0.2, seed=0)
    sample = load_case(train[0])                      # numpy arrays, scaling applied
    patch = train_transforms((64, 64, 64), labels="2021", seed=0)(sample)

Two on-disk layouts are recognised per case, from the file names alone:

* BraTS 2018-2021 and FeTS 2022: ``<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels
  0 (background), 1 (necrotic / non-enhancing core), 2 (oedema), 4 (enhancing tumour).
* BraTS 2023+: ``<ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, the same labels except that the
  enhancing tumour is 3.  ``t1n``/``t1c``/``t2w``/``t2f`` map to ``t1``/``t1ce``/``t2``/``flair``.

Uncompressed ``.nii`` files are accepted too.  Which label convention a federation uses is a
configuration decision (``labels="2021"`` or ``"2023"``), not guessed from the files: a
segmentation holding labels of the other convention is an error found by :func:`preflight`.

Regions (the channels of the label tensor and of the model output, in :data:`REGIONS` order):
tumour core TC = {1, ET}, whole tumour WT = {1, 2, ET}, enhancing tumour ET = {ET}.

Images are channel-first ``(4, X, Y, Z)`` float32 in :data:`MODALITIES` order, voxel values in
the scanner's arbitrary intensity units (NIfTI scaling applied); spatial axes are the voxel axes
of the files (no reorientation or resampling: BraTS files are already co-registered at 1 mm).
"""

from __future__ import annotations

import csv
import gzip
import re
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndicesd,
    Lambdad,
    MapTransform,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils import convert_to_dst_type, convert_to_numpy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from fedbrats.errors import ConfigError, DataError, DataProblem, FedbratsError

__all__ = [
    "MODALITIES",
    "REGIONS",
    "LABEL_CONVENTIONS",
    "Case",
    "ConvertLabelsToRegionsd",
    "discover_sites",
    "preflight",
    "load_case",
    "labels_to_regions",
    "regions_to_labels",
    "split_cases",
    "train_transforms",
    "val_transforms",
]

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Canonical channel order of the image tensor."""

REGIONS: tuple[str, ...] = ("tc", "wt", "et")
"""Canonical channel order of the label tensor and of the model output."""

LABEL_CONVENTIONS: dict[str, tuple[int, ...]] = {"2021": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}
"""Valid segmentation labels per convention; the last one is the enhancing tumour (ET)."""

# File-name grammar of the two layouts: separator and on-disk modality name -> canonical name.
_LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}),
    "2023": ("-", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}),
}
_NAME_RES: dict[str, re.Pattern[str]] = {
    layout: re.compile(
        rf"^(?P<prefix>.+){re.escape(sep)}(?P<mod>{'|'.join(sorted(names, key=len, reverse=True))})"
        r"(?P<ext>\.nii(?:\.gz)?)$",
        re.IGNORECASE,
    )
    for layout, (sep, names) in _LAYOUTS.items()
}
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)

# What nibabel, gzip and zlib raise on a missing, truncated or corrupt file.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    ImageFileError,
    HeaderDataError,
    WrapStructError,
)
_AFFINE_ATOL = 1e-3  # mm


@dataclass(frozen=True)
class Case:
    """One BraTS subject as found on disk.

    Attributes:
        case_id: Subject identifier (the case folder's name, e.g. ``BraTS2021_00000``).
        site_id: The site (data owner) the case belongs to.
        images: Canonical modality name (see :data:`MODALITIES`) -> NIfTI file.  A modality
            missing on disk is absent from the mapping; :func:`preflight` reports it.
        seg: The segmentation file, or None for an unlabelled case.
    """

    case_id: str
    site_id: str
    images: Mapping[str, Path]
    seg: Path | None


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``site-2`` before ``site-10``."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def _parse_name(name: str) -> tuple[str, str, str, str] | None:
    """Parse a BraTS file name.

    Returns:
        ``(layout, prefix, canonical_modality_or_seg, extension)`` or None when the name does not
        follow either layout.
    """
    for layout, pattern in _NAME_RES.items():
        m = pattern.match(name)
        if m:
            names = _LAYOUTS[layout][1]
            return layout, m.group("prefix"), names[m.group("mod").lower()], m.group("ext")
    return None


def _scan_case(case_dir: Path, site_id: str) -> tuple[Case | None, list[DataProblem]]:
    """Build a :class:`Case` from the BraTS files in ``case_dir``.

    Returns:
        The case (None if the folder holds no BraTS file) and the problems found: no BraTS file,
        both layouts mixed, or two files for one modality.
    """
    case_id = case_dir.name
    found: dict[str, list[Path]] = {}
    layouts: set[str] = set()
    for path in sorted(case_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        parsed = _parse_name(path.name)
        if parsed is None:
            continue
        layout, _prefix, kind, _ext = parsed
        layouts.add(layout)
        found.setdefault(kind, []).append(path)

    problems: list[DataProblem] = []
    if not found:
        niftis = sorted(p.name for p in case_dir.iterdir() if _NIFTI_RE.search(p.name))
        detail = f"; NIfTI files present: {niftis}" if niftis else ""
        problems.append(
            DataProblem(
                case_id,
                str(case_dir),
                "no BraTS image files found (expected <ID>_{t1,t1ce,t2,flair,seg}.nii.gz or "
                f"<ID>-{{t1n,t1c,t2w,t2f,seg}}.nii.gz){detail}",
            )
        )
        return None, problems
    if len(layouts) > 1:
        problems.append(
            DataProblem(
                case_id,
                str(case_dir),
                "file names mix the 2018-2022 layout (<ID>_t1ce...) and the 2023+ layout "
                "(<ID>-t1c...)",
            )
        )
    for kind, paths in sorted(found.items()):
        if len(paths) > 1:
            problems.append(
                DataProblem(
                    case_id,
                    str(case_dir),
                    f"several files for {kind!r}: {[p.name for p in paths]}",
                )
            )
    images = {m: found[m][0] for m in MODALITIES if m in found}
    seg = found["seg"][0] if "seg" in found else None
    return Case(case_id=case_id, site_id=site_id, images=images, seg=seg), problems


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )


def _read_partitioning(csv_path: Path) -> list[tuple[int, str, str]]:
    """Read a FeTS ``partitioning_*.csv``.

    Columns are looked up by name (``Subject_ID``, ``Partition_ID``); their order and any extra
    columns do not matter.

    Returns:
        ``(line_number, subject_id, partition_id)`` per data row; the header is line 1.

    Raises:
        ConfigError: The file cannot be read, lacks a column, is empty, or has a row with an
            empty cell or a repeated subject; every problem is listed, each naming its line.
    """
    source = str(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("Subject_ID", "Partition_ID") if c not in header]
            if missing:
                raise ConfigError(
                    source,
                    [f"line 1: missing column {c!r} (columns found: {header})" for c in missing],
                )
            reader.fieldnames = header
            rows: list[tuple[int, str, str]] = []
            problems: list[str] = []
            first_line: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                subject = (row.get("Subject_ID") or "").strip()
                partition = (row.get("Partition_ID") or "").strip()
                if not subject:
                    problems.append(f"line {line}: empty Subject_ID")
                if not partition:
                    problems.append(f"line {line}: empty Partition_ID for subject {subject!r}")
                if subject and subject in first_line:
                    problems.append(
                        f"line {line}: subject {subject!r} already listed on line "
                        f"{first_line[subject]}"
                    )
                if subject and partition and subject not in first_line:
                    rows.append((line, subject, partition))
                if subject:
                    first_line.setdefault(subject, line)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(source, [f"cannot read partitioning file: {exc}"]) from exc
    if not rows and not problems:
        problems.append("no subjects listed (every site would be empty)")
    if problems:
        raise ConfigError(source, problems)
    return rows


def discover_sites(
    root: Path,
    *,
    partitioning: Path | None = None,
    site: str | None = None,
    problems_out: list[DataProblem] | None = None,
) -> dict[str, list[Case]]:
    """Find the BraTS cases under ``root`` and group them by site.

    Site membership comes from, in order of precedence:

    1. ``partitioning``, a FeTS ``partitioning_*.csv`` (columns ``Subject_ID`` and
       ``Partition_ID``, read by name): site id ``site-<Partition_ID>``, case folder
       ``root/<Subject_ID>/``;
    2. ``root/partitioning_1.csv`` if it exists (same format);
    3. per-site folders ``root/<site_id>/<case_id>/``.

    The layout (2018-2022 ``_t1ce`` or 2023+ ``-t1c``) is recognised per case from its file names.
    Hidden entries (names starting with ".") are ignored.  Files are not opened here; see
    :func:`preflight`.

    Args:
        root: Data root folder.
        partitioning: Optional FeTS partitioning csv.
        site: Only this site's cases are scanned (a node looks at its own data only: another
            site's rows in a shared partitioning csv, or another site's folder, are ignored).
        problems_out: If given, discovery problems are appended here and the cases found are
            returned anyway, so a caller can report them together with the preflight's.

    Returns:
        ``{site_id: [Case, ...]}``, sites and cases in natural sort order.

    Raises:
        ConfigError: The partitioning csv is unreadable, lacks a ``Subject_ID`` or
            ``Partition_ID`` column, has no rows, or has rows with empty cells or repeated
            subjects (each problem names the csv and line).
        DataError: ``root`` is missing, a subject listed in the csv has no folder (naming csv and
            line), a site folder holds no case, or a case folder holds no BraTS file, mixes
            layouts or has two files for one modality.  All problems are listed at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError([DataProblem("-", str(root), "data root folder does not exist")])
    if partitioning is None and (root / "partitioning_1.csv").is_file():
        partitioning = root / "partitioning_1.csv"

    problems: list[DataProblem] = []
    sites: dict[str, list[Case]] = {}
    if partitioning is not None:
        partitioning = Path(partitioning)
        if not partitioning.is_file():
            raise ConfigError(str(partitioning), ["partitioning file does not exist"])
        for line, subject, partition in _read_partitioning(partitioning):
            site_id = f"site-{partition}"
            if site is not None and site_id != site:
                continue
            case_dir = root / subject
            if not case_dir.is_dir():
                problems.append(
                    DataProblem(
                        subject,
                        str(case_dir),
                        f"listed in {partitioning} line {line} (Partition_ID {partition}) but "
                        "the case folder does not exist",
                    )
                )
                sites.setdefault(site_id, [])
                continue
            case, case_problems = _scan_case(case_dir, site_id)
            problems.extend(case_problems)
            sites.setdefault(site_id, [])
            if case is not None:
                sites[site_id].append(case)
    else:
        site_dirs = _visible_dirs(root)
        if site is not None:
            site_dirs = [d for d in site_dirs if d.name == site]
        if not site_dirs:
            problems.append(DataProblem("-", str(root), "no site folders found" if site is None
                                        else f"no folder {site!r} for this site"))
        for site_dir in site_dirs:
            case_dirs = _visible_dirs(site_dir)
            if not case_dirs:
                hint = ""
                if any(_parse_name(p.name) for p in site_dir.iterdir() if p.is_file()):
                    hint = (
                        " (it holds BraTS files itself, so it looks like a case folder: for a "
                        "flat layout give a partitioning csv)"
                    )
                reason = f"site {site_dir.name!r} has no case folders{hint}"
                problems.append(DataProblem("-", str(site_dir), reason))
                continue
            cases = []
            for case_dir in case_dirs:
                case, case_problems = _scan_case(case_dir, site_dir.name)
                problems.extend(case_problems)
                if case is not None:
                    cases.append(case)
            sites[site_dir.name] = cases
    if problems and problems_out is None:
        raise DataError(problems, header=f"data discovery under {root}")
    if problems_out is not None:
        problems_out.extend(problems)
    return {
        site: sorted(cases, key=lambda c: _natural_key(c.case_id))
        for site, cases in sorted(sites.items(), key=lambda kv: _natural_key(kv[0]))
    }


# --------------------------------------------------------------------------------------------
# Preflight and loading
# --------------------------------------------------------------------------------------------


def _check_labels_name(labels: str) -> tuple[int, ...]:
    if labels not in LABEL_CONVENTIONS:
        raise ConfigError(
            "labels",
            [f"unknown label convention {labels!r}; expected one of {sorted(LABEL_CONVENTIONS)}"],
        )
    return LABEL_CONVENTIONS[labels]


def _expected_path(case: Case, modality: str) -> Path | None:
    """Where the file of ``modality`` should be, judging by the case's other files."""
    for path in [*case.images.values(), *([case.seg] if case.seg is not None else [])]:
        parsed = _parse_name(Path(path).name)
        if parsed is None:
            continue
        layout, prefix, _kind, ext = parsed
        sep, names = _LAYOUTS[layout]
        disk_name = next(n for n, canonical in names.items() if canonical == modality)
        return Path(path).parent / f"{prefix}{sep}{disk_name}{ext}"
    return None


def _fmt_set(values: Sequence[int] | set[int]) -> str:
    return "{" + ", ".join(str(int(v)) for v in sorted(values)) + "}"


def _label_values(arr: np.ndarray) -> set[int]:
    """Distinct values of an integral array (fast path for small non-negative labels)."""
    if arr.size == 0:
        return set()
    lo, hi = int(arr.min()), int(arr.max())
    if 0 <= lo and hi <= 255:
        counts = np.bincount(arr.astype(np.uint8, copy=False).ravel(), minlength=hi + 1)
        return {int(v) for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(arr)}


def _is_integral(arr: np.ndarray) -> bool:
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return True
    return bool(np.all(np.isfinite(arr))) and bool(np.array_equal(arr, np.round(arr)))


def _read_image(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Load a NIfTI image fully, as float32 with scl_slope/scl_inter applied.

    Raises:
        The errors in ``_READ_ERRORS`` on a missing, truncated or corrupt file.
    """
    img = nib.load(str(path))
    data = img.get_fdata(dtype=np.float32, caching="unchanged")
    return img, data


def _check_gzip_stream(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Decompress a ``.gz`` file to its last byte, which checks its CRC-32 and length.

    nibabel reads only the bytes the array needs, so a file cut inside the gzip trailer (or with
    a corrupt trailer) would otherwise load without complaint.  Streams; keeps nothing.

    Raises:
        EOFError: The stream ends before its end-of-stream marker and trailer.
        OSError: Corrupt data or a CRC-32 / length mismatch (``gzip.BadGzipFile``), or the file
            cannot be read.
        zlib.error: Corrupt compressed data.
    """
    with gzip.open(path, "rb") as fh:
        while fh.read(chunk_bytes):
            pass


def _read_seg(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Load a segmentation fully, in its stored dtype (or float if the header scales it)."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    return img, data


def _unreadable(case: Case, path: Path, exc: BaseException) -> DataProblem:
    return DataProblem(
        case.case_id, str(path), f"truncated or unreadable: {type(exc).__name__}: {exc}"
    )


def _check_image(case: Case, modality: str, path: Path) -> tuple[list[DataProblem], tuple | None]:
    """Problems of one modality file, and its ``(shape, affine)`` when it could be read."""

    def problem(reason: str) -> DataProblem:
        return DataProblem(case.case_id, str(path), reason)

    if not path.is_file():
        return [problem(f"{modality} file does not exist")], None
    try:
        img, data = _read_image(path)
        if path.name.lower().endswith(".gz"):
            _check_gzip_stream(path)
    except _READ_ERRORS as exc:
        return [_unreadable(case, path, exc)], None
    if data.ndim != 3:
        return [problem(f"{modality} is not a 3D volume: shape {data.shape}")], None
    geometry = (tuple(data.shape), np.asarray(img.affine, dtype=np.float64))
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        reason = f"modality {modality!r} has {n_bad} non-finite voxel(s) (NaN or Inf)"
        return [problem(reason)], geometry
    if data.size == 0 or data.min() == data.max():
        value = float(data.flat[0]) if data.size else float("nan")
        what = "all voxels are 0" if value == 0 else f"all voxels have the same value {value:g}"
        return [problem(f"empty modality {modality!r} in case {case.case_id}: {what}")], geometry
    return [], geometry


def _check_seg(
    case: Case, path: Path, valid_labels: tuple[int, ...], labels: str
) -> tuple[list[DataProblem], tuple | None]:
    """Problems of the segmentation file, and its ``(shape, affine)`` when it could be read."""

    def problem(reason: str) -> DataProblem:
        return DataProblem(case.case_id, str(path), reason)

    if not path.is_file():
        return [problem("segmentation file does not exist")], None
    try:
        img, seg = _read_seg(path)
        if path.name.lower().endswith(".gz"):
            _check_gzip_stream(path)
    except _READ_ERRORS as exc:
        return [_unreadable(case, path, exc)], None
    if seg.ndim != 3:
        return [problem(f"seg is not a 3D volume: shape {seg.shape}")], None
    geometry = (tuple(seg.shape), np.asarray(img.affine, dtype=np.float64))
    if seg.dtype.kind == "f" and not np.all(np.isfinite(seg)):
        n_bad = int(seg.size - np.count_nonzero(np.isfinite(seg)))
        return [problem(f"seg has {n_bad} non-finite voxel(s) (NaN or Inf)")], geometry
    if not _is_integral(seg):
        return [problem("seg holds non-integer values (not a label map)")], geometry
    found = _label_values(seg)
    extra = found - set(valid_labels)
    if not extra:
        return [], geometry
    hint = ""
    for other, other_labels in LABEL_CONVENTIONS.items():
        if other != labels and found <= set(other_labels):
            hint = (
                f" (these look like {other}-convention labels: is the federation's "
                "labels setting wrong?)"
            )
    reason = (
        f"labels outside the {labels!r} convention in {path.name}: "
        f"found labels {_fmt_set(found)}, unexpected {_fmt_set(extra)}; "
        f"expected labels {_fmt_set(valid_labels)}{hint}"
    )
    return [problem(reason)], geometry


def _check_case(case: Case, valid_labels: tuple[int, ...], labels: str) -> list[DataProblem]:
    """Every problem of one case; reads one file at a time."""
    problems: list[DataProblem] = []
    geometry: list[tuple[str, Path, tuple[int, ...], np.ndarray]] = []  # what, path, shape, affine

    for modality in MODALITIES:
        if modality not in case.images:
            expected = _expected_path(case, modality)
            where = str(expected) if expected else f"<{case.case_id}>_{modality}.nii.gz"
            reason = f"missing modality {modality!r}: expected file {where}"
            problems.append(DataProblem(case.case_id, where, reason))
    unknown = sorted(set(case.images) - set(MODALITIES))
    if unknown:
        reason = f"unknown modality names {unknown}; expected {MODALITIES}"
        problems.append(DataProblem(case.case_id, "-", reason))

    for modality in MODALITIES:
        if modality in case.images:
            path = Path(case.images[modality])
            found, geo = _check_image(case, modality, path)
            problems.extend(found)
            if geo is not None:
                geometry.append((modality, path, *geo))
    if case.seg is not None:
        path = Path(case.seg)
        found, geo = _check_seg(case, path, valid_labels, labels)
        problems.extend(found)
        if geo is not None:
            geometry.append(("seg", path, *geo))

    if geometry:
        ref_what, ref_path, ref_shape, ref_affine = geometry[0]
        for what, path, shape, affine in geometry[1:]:
            this, ref = f"{path.name} ({what})", f"{ref_path.name} ({ref_what})"
            if shape != ref_shape:
                reason = f"shape mismatch: {this} has shape {shape} but {ref} has shape {ref_shape}"
                problems.append(DataProblem(case.case_id, str(path), reason))
            elif not np.allclose(affine, ref_affine, atol=_AFFINE_ATOL):
                diff = float(np.max(np.abs(affine - ref_affine)))
                reason = (
                    f"affine mismatch: {this} and {ref} differ by up to {diff:.4g} "
                    f"(tolerance {_AFFINE_ATOL}); {path.name} affine "
                    f"{np.round(affine, 4).tolist()}, {ref_path.name} affine "
                    f"{np.round(ref_affine, 4).tolist()}"
                )
                problems.append(DataProblem(case.case_id, str(path), reason))
    return problems


def preflight(
    cases: Sequence[Case],
    *,
    labels: str,
    require_seg: bool = True,
    known_problems: Sequence[DataProblem] = (),
) -> None:
    """Check every file of every case before training starts.

    Each file is read completely, one file at a time, and every ``.gz`` stream is decompressed
    to its last byte (CRC-32 and length checked), so a truncated file is caught here, not
    mid-round.  Checked: every modality present; every file readable to its last byte; 3D
    volumes with equal shapes and affines (``np.allclose``, atol 1e-3 mm) across a case's files;
    no non-finite voxels; no empty (all-zero or constant) modality; segmentation labels integral
    and within ``LABEL_CONVENTIONS[labels]``.

    Args:
        cases: The cases to check (typically one site's).
        labels: Label convention of the federation, a key of :data:`LABEL_CONVENTIONS`.
        require_seg: Every case must have a segmentation (training and validation need one;
            ``fedbrats predict`` passes False).
        known_problems: Problems found earlier (by discovery), reported in the same error.

    Raises:
        ConfigError: ``labels`` is not a known convention.
        DataError: One error whose ``problems`` lists every problem of every case, each a
            :class:`~fedbrats.errors.DataProblem` naming the case and the file.
    """
    valid_labels = _check_labels_name(labels)
    problems: list[DataProblem] = list(known_problems)
    for case in cases:
        if require_seg and case.seg is None:
            where = next(iter(case.images.values()), None)
            folder = str(where.parent) if where is not None else case.case_id
            problems.append(DataProblem(case.case_id, folder, "no segmentation file (seg): every "
                                        "training and validation case needs one"))
        problems.extend(_check_case(case, valid_labels, labels))
    if problems:
        raise DataError(problems, header=f"preflight of {len(cases)} case(s)")


def load_case(case: Case) -> dict:
    """Load one case into memory (call :func:`preflight` first for a full check).

    Args:
        case: The case to load.

    Returns:
        A dict with

        * ``"image"``: float32 array ``(4, X, Y, Z)``, channels in :data:`MODALITIES` order, NIfTI
          scl_slope/scl_inter applied (intensity in the scanner's arbitrary units);
        * ``"label"``: uint8 array ``(X, Y, Z)`` of raw BraTS labels, or None when
          ``case.seg`` is None;
        * ``"affine"``: float64 ``(4, 4)`` voxel-to-world (mm) affine of the t1 file;
        * ``"case_id"``: the case id.

    Raises:
        DataError: A modality is missing, a file is unreadable or not 3D, shapes differ, or the
            segmentation is not an integral label map in 0..255.
    """
    header = f"loading case {case.case_id}"

    def fail(path: Path | str, reason: str) -> DataError:
        return DataError([DataProblem(case.case_id, str(path), reason)], header=header)

    def where(modality: str) -> str:
        return str(_expected_path(case, modality) or "-")

    missing = [m for m in MODALITIES if m not in case.images]
    if missing:
        problems = [DataProblem(case.case_id, where(m), f"missing modality {m!r}") for m in missing]
        raise DataError(problems, header=header)

    image: np.ndarray | None = None
    affine: np.ndarray | None = None
    for channel, modality in enumerate(MODALITIES):
        path = Path(case.images[modality])
        try:
            img, data = _read_image(path)
        except _READ_ERRORS as exc:
            raise DataError([_unreadable(case, path, exc)], header=header) from exc
        if data.ndim != 3:
            raise fail(path, f"{modality} is not a 3D volume: shape {data.shape}")
        if image is None:
            image = np.empty((len(MODALITIES), *data.shape), dtype=np.float32)
            affine = np.array(img.affine, dtype=np.float64)
        elif data.shape != image.shape[1:]:
            t1_shape = image.shape[1:]
            raise fail(path, f"shape mismatch: {modality} has {data.shape}, t1 has {t1_shape}")
        image[channel] = data
        del data, img

    label: np.ndarray | None = None
    if case.seg is not None:
        path = Path(case.seg)
        try:
            _img, seg = _read_seg(path)
        except _READ_ERRORS as exc:
            raise DataError([_unreadable(case, path, exc)], header=header) from exc
        if seg.shape != image.shape[1:]:
            raise fail(path, f"shape mismatch: seg has {seg.shape}, t1 has {image.shape[1:]}")
        if not _is_integral(seg):
            raise fail(path, "seg holds non-integer or non-finite values (not a label map)")
        if seg.size and (seg.min() < 0 or seg.max() > 255):
            raise fail(path, f"seg labels outside 0..255 (min {seg.min()}, max {seg.max()})")
        label = np.asarray(seg).astype(np.uint8)

    return {"image": image, "label": label, "affine": affine, "case_id": case.case_id}


# --------------------------------------------------------------------------------------------
# Labels <-> regions
# --------------------------------------------------------------------------------------------


def labels_to_regions(label: np.ndarray, *, labels: str) -> np.ndarray:
    """Convert a BraTS label map to the three nested tumour regions.

    Args:
        label: Integral label map ``(X, Y, Z)`` (any spatial shape; a leading channel axis of
            size 1, as MONAI produces, is dropped) with values in ``LABEL_CONVENTIONS[labels]``.
        labels: Label convention, ``"2021"`` (ET = 4) or ``"2023"`` (ET = 3).

    Returns:
        uint8 array ``(3, X, Y, Z)`` of 0/1 in :data:`REGIONS` order: TC = {1, ET},
        WT = {1, 2, ET}, ET = {ET}.

    Raises:
        ConfigError: ``labels`` is not a known convention.
        DataError: The map holds non-integral values or labels outside the convention.
    """
    valid = _check_labels_name(labels)
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if not _is_integral(arr):
        raise DataError(
            ["label map holds non-integer or non-finite values"], header="labels_to_regions"
        )
    extra = _label_values(arr) - set(valid)
    if extra:
        raise DataError(
            [
                f"label map holds labels {_fmt_set(extra)} outside the {labels!r} convention "
                f"(expected labels {_fmt_set(valid)})"
            ],
            header="labels_to_regions",
        )
    et_label = valid[-1]
    out = np.empty((3, *arr.shape), dtype=np.uint8)
    et = arr == et_label
    out[2] = et
    out[0] = (arr == 1) | et
    out[1] = arr != 0
    return out


def regions_to_labels(regions: np.ndarray, *, labels: str) -> np.ndarray:
    """Convert three region masks back to a BraTS label map (e.g. for writing predictions).

    Precedence where masks are not nested (as can happen in predictions): ET wins over
    TC-not-ET (label 1, necrotic / non-enhancing core), which wins over WT-only (label 2, oedema).

    Args:
        regions: ``(3, X, Y, Z)`` masks in :data:`REGIONS` order; bool, or numbers where non-zero
            means inside (threshold probabilities before calling).
        labels: Label convention, ``"2021"`` (ET = 4) or ``"2023"`` (ET = 3).

    Returns:
        uint8 label map ``(X, Y, Z)``.

    Raises:
        ConfigError: ``labels`` is not a known convention.
        ValueError: ``regions`` does not have 3 channels on axis 0.
    """
    valid = _check_labels_name(labels)
    masks = np.asarray(regions)
    if masks.ndim < 1 or masks.shape[0] != len(REGIONS):
        raise ValueError(
            f"regions must have shape (3, X, Y, Z) in {REGIONS} order, got {masks.shape}"
        )
    masks = masks.astype(bool, copy=False)
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    out[masks[1]] = 2
    out[masks[0]] = 1
    out[masks[2]] = valid[-1]
    return out


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def split_cases(
    cases: Sequence[Case], *, val_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Split cases into training and validation sets, reproducibly.

    The split depends only on the set of case ids (input order does not matter), ``val_fraction``
    and ``seed``.  With ``val_fraction > 0`` and at least two cases, validation gets
    ``round(val_fraction * n)`` cases but at least one, and training keeps at least one.

    Args:
        cases: The cases to split.
        val_fraction: Fraction of cases for validation, in ``[0, 1)``.
        seed: Seed of the shuffle.

    Returns:
        ``(train, val)``, each sorted by case id.

    Raises:
        ConfigError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not isinstance(val_fraction, (int, float)) or not (0.0 <= float(val_fraction) < 1.0):
        raise ConfigError("val_fraction", [f"must be in [0, 1), got {val_fraction!r}"])
    ordered = sorted(cases, key=lambda c: (c.site_id, c.case_id))
    n = len(ordered)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------------------------
# MONAI transforms
# --------------------------------------------------------------------------------------------


class ConvertLabelsToRegionsd(MapTransform):
    """Dictionary transform: raw BraTS label map ``(X, Y, Z)`` -> regions ``(3, X, Y, Z)`` uint8.

    Unlike MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` (ET = 4 only), this supports
    both label conventions; see :func:`labels_to_regions`.  A None label (unlabelled case) is
    passed through unchanged.  numpy in, numpy out; torch in, torch out.
    """

    def __init__(self, keys: KeysCollection, *, labels: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        _check_labels_name(labels)
        self.labels = labels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:
                continue
            regions = labels_to_regions(convert_to_numpy(d[key]), labels=self.labels)
            d[key] = convert_to_dst_type(regions, d[key], dtype=regions.dtype)[0]
        return d


class _RandCropByPosNegLabelOned(RandCropByPosNegLabeld):
    """``RandCropByPosNegLabeld`` with ``num_samples=1`` that returns the dict, not a 1-list.

    This keeps the training pipeline dict-in/dict-out, so it works with a plain
    ``torch.utils.data.DataLoader`` as well as with MONAI's.
    """

    def __call__(self, data, lazy=None):  # type: ignore[override]
        return super().__call__(data, lazy=lazy)[0]


class _Compose(Compose):
    """``Compose`` that re-raises a fedbrats error from inside a transform as itself.

    MONAI wraps every exception raised by a transform in ``RuntimeError("applying transform
    ...")``; this unwraps it, so that callers can catch :class:`DataError` as documented.
    """

    def __call__(self, input_, *args, **kwargs):  # type: ignore[override]
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, FedbratsError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


class _RequireLabeld(MapTransform):
    """Raise :class:`DataError` (naming the case) when the label is missing or None."""

    def __init__(self) -> None:
        super().__init__(keys=["label"], allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        if data.get("label") is None:
            case_id = str(data.get("case_id", "-"))
            raise DataError(
                [DataProblem(case_id, "-", "training needs a segmentation; the case has none")],
                header="train_transforms",
            )
        return data


def _copy_array(arr: Any) -> Any:
    """A private copy, so that in-place MONAI steps never write into the caller's sample."""
    return arr.clone() if isinstance(arr, torch.Tensor) else np.array(arr, copy=True)


def train_transforms(patch_size: tuple[int, int, int], *, labels: str, seed: int) -> Compose:
    """Training pipeline for one :func:`load_case` sample.

    Steps: raw labels -> TC/WT/ET regions; zero-pad to at least ``patch_size``; foreground /
    background voxel indices (background restricted to the head, i.e. where any raw modality is
    > 0); channel-wise z-score over non-zero voxels (background stays exactly 0); one random
    ``patch_size`` crop centred on tumour (WT) or on background with probability 1:1; random flips
    on each of the 3 axes (p = 0.5); random intensity scale (factor 1 +- 0.1) and shift
    (+- 0.1, in units of the z-scored intensity), each with p = 1 (as in MONAI's BraTS recipe;
    the shift moves the background of a training patch off 0, the z-scoring itself does not).
    The input sample is never modified, so it can be cached and reused.

    Args:
        patch_size: Crop size ``(X, Y, Z)`` in voxels.
        labels: Label convention, ``"2021"`` or ``"2023"``.
        seed: Seed of all random transforms (MONAI's ``set_random_state``).

    Returns:
        A ``Compose`` mapping ``{"image": (4, X, Y, Z) float32, "label": (X, Y, Z) uint8, ...}``
        to one dict with ``"image"`` float32 tensor ``(4, *patch_size)`` and ``"label"`` float32
        tensor ``(3, *patch_size)`` of 0/1 in :data:`REGIONS` order; other keys (``"affine"``,
        ``"case_id"``) are passed through.

    Raises:
        ConfigError: ``labels`` is unknown or ``patch_size`` is not 3 positive integers.
        DataError: (when applied) the sample has no label, or labels outside the convention.
    """
    _check_labels_name(labels)
    if (
        not isinstance(patch_size, Sequence)
        or len(patch_size) != 3
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in patch_size)
    ):
        raise ConfigError("patch_size", [f"must be 3 positive integers, got {patch_size!r}"])
    size = tuple(int(s) for s in patch_size)
    keys = ["image", "label"]
    pipeline = _Compose(
        [
            _RequireLabeld(),
            Lambdad(keys="image", func=_copy_array),  # NormalizeIntensityd works in place
            ConvertLabelsToRegionsd(keys="label", labels=labels),
            SpatialPadd(keys=keys, spatial_size=size, mode="constant"),
            FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            _RandCropByPosNegLabelOned(
                keys=keys,
                label_key="label",
                spatial_size=size,
                pos=1.0,
                neg=1.0,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
    pipeline.set_random_state(seed=seed)
    return pipeline


def val_transforms(*, labels: str) -> Compose:
    """Validation / inference pipeline for one :func:`load_case` sample (full volume, no crop).

    Steps: raw labels -> TC/WT/ET regions (a None label stays None); channel-wise z-score over
    non-zero voxels (background stays exactly 0).

    Args:
        labels: Label convention, ``"2021"`` or ``"2023"``.

    Returns:
        A ``Compose`` giving ``"image"`` float32 tensor ``(4, X, Y, Z)`` and ``"label"`` float32
        tensor ``(3, X, Y, Z)`` of 0/1 in :data:`REGIONS` order (or None); other keys passed
        through.

    Raises:
        ConfigError: ``labels`` is unknown.
        DataError: (when applied) labels outside the convention.
    """
    _check_labels_name(labels)
    return _Compose(
        [
            Lambdad(keys="image", func=_copy_array),  # NormalizeIntensityd works in place
            ConvertLabelsToRegionsd(keys="label", labels=labels, allow_missing_keys=True),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False),
            _EnsureOptionalLabeld(),
        ]
    )


class _EnsureOptionalLabeld(MapTransform):
    """``EnsureTyped`` for ``"label"`` that leaves a missing or None label alone."""

    def __init__(self) -> None:
        super().__init__(keys=["label"], allow_missing_keys=True)
        self._ensure = EnsureTyped(
            keys="label", data_type="tensor", dtype=torch.float32, track_meta=False
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("label") is None:
            return d
        return self._ensure(d)
