"""Segment one BraTS case with a trained model file and write the result as NIfTI.

The output is a uint8 label map in the model's BraTS label convention (``2021``: 0/1/2/4,
``2023``: 0/1/2/3), on the voxel grid of the input, with the input T1's header and affine, so
ITK-SNAP and 3D Slicer overlay it on the scans without resampling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.config import EvaluationConfig
from fedbrats.errors import DataError, DataProblem, FedbratsError
from node import data as node_data
from node.model import load_model_file, select_device
from node.train import predict_regions

# On-disk modality names of both BraTS layouts -> canonical names (node.data.MODALITIES).
_LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "2018-2022": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}),
    "2023+": ("-", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}),
}
_PATTERNS = {
    layout: re.compile(
        rf"^(?P<id>.+){re.escape(sep)}(?P<mod>{'|'.join(sorted(names, key=len, reverse=True))})"
        r"\.nii(?:\.gz)?$",
        re.IGNORECASE,
    )
    for layout, (sep, names) in _LAYOUTS.items()
}


def find_case_files(case_dir: Path) -> node_data.Case:
    """Find the four modalities of one case folder (either BraTS naming convention).

    Accepts ``<ID>_{t1,t1ce,t2,flair}.nii[.gz]`` (BraTS 2018-2021, FeTS 2022) or
    ``<ID>-{t1n,t1c,t2w,t2f}.nii[.gz]`` (BraTS 2023+).  A segmentation file, if present, is
    ignored (``seg=None``).

    Returns:
        A :class:`node.data.Case` with ``site_id="predict"`` and ``case_id`` the file prefix.

    Raises:
        DataError: naming ``case_dir``: it is not a folder, a modality is missing, a modality
            has several files, or the two naming conventions are mixed.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise DataError([DataProblem(case_dir.name, str(case_dir), "case folder does not exist")],
                        header=f"predict {case_dir}")
    found: dict[str, list[Path]] = {}
    layouts: set[str] = set()
    ids: set[str] = set()
    for path in sorted(case_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        for layout, pattern in _PATTERNS.items():
            m = pattern.match(path.name)
            if m:
                kind = _LAYOUTS[layout][1][m.group("mod").lower()]
                if kind != "seg":
                    layouts.add(layout)
                    ids.add(m.group("id"))
                    found.setdefault(kind, []).append(path)
                break
    case_id = sorted(ids)[0] if len(ids) == 1 else case_dir.name
    problems: list[DataProblem] = []
    if len(layouts) > 1:
        problems.append(DataProblem(case_id, str(case_dir),
                                    "file names mix the <ID>_t1ce and the <ID>-t1c naming conventions"))
    for kind, paths in sorted(found.items()):
        if len(paths) > 1:
            problems.append(DataProblem(case_id, str(case_dir),
                                        f"several files for {kind!r}: {[p.name for p in paths]}"))
    missing = [m for m in node_data.MODALITIES if m not in found]
    if missing:
        present = sorted(p.name for p in case_dir.iterdir() if p.name.lower().endswith((".nii", ".nii.gz")))
        problems.append(DataProblem(
            case_id, str(case_dir),
            f"missing modalities {missing} in {case_dir} (expected <ID>_{{t1,t1ce,t2,flair}}.nii.gz or "
            f"<ID>-{{t1n,t1c,t2w,t2f}}.nii.gz; NIfTI files present: {present})",
        ))
    if problems:
        raise DataError(problems, header=f"predict {case_dir}")
    images = {m: found[m][0] for m in node_data.MODALITIES}
    return node_data.Case(case_id=case_id, site_id="predict", images=images, seg=None)


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    raise FedbratsError(f"output file {path}: name must end with .nii.gz or .nii")


def predict_case(
    model_file: Path,
    case_dir: Path,
    out_file: Path,
    *,
    evaluation: EvaluationConfig | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Segment the case in ``case_dir`` with the model in ``model_file``; write ``out_file``.

    Steps: load and verify the model file (:func:`node.model.load_model_file`); find the four
    modalities (:func:`find_case_files`); :func:`node.data.preflight` with the model's label
    convention; :func:`node.data.load_case`; z-score as :func:`node.data.val_transforms`;
    sliding-window inference with ``evaluation.roi_size`` / ``overlap``; sigmoid >
    ``evaluation.threshold``; :func:`node.data.regions_to_labels`; write the uint8 label map
    with the T1's header and affine (written atomically: temp file, then rename).

    Args:
        model_file: a ``fedbrats-model/1`` file.
        case_dir: folder with ``<ID>_{t1,t1ce,t2,flair}.nii[.gz]`` or
            ``<ID>-{t1n,t1c,t2w,t2f}.nii[.gz]``; a seg file there is ignored.
        out_file: destination ``.nii.gz`` (or ``.nii``); parent folders are created.  An
            existing file is refused unless ``overwrite``; a file of the input case always.
        overwrite: replace an existing ``out_file``.
        evaluation: sliding window and threshold; ``None`` = :class:`EvaluationConfig` defaults.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        ``out_file``.

    Raises:
        FedbratsError: the model file is invalid (names it), ``cuda`` is unavailable, or the
            output cannot be written (names it).
        DataError: modalities are missing or unreadable (names ``case_dir`` / the file).
    """
    out_file = Path(out_file)
    suffix = _nifti_suffix(out_file)
    if out_file.exists() and not overwrite:
        raise FedbratsError(f"{out_file} already exists; refusing to overwrite it (pass "
                            f"--force to replace it)")
    if out_file.parent.exists() and not out_file.parent.is_dir():
        raise FedbratsError(f"cannot write {out_file}: {out_file.parent} is not a folder")
    evaluation = evaluation if evaluation is not None else EvaluationConfig()
    model, meta = load_model_file(model_file)
    labels = meta["labels"]
    case = find_case_files(Path(case_dir))
    if out_file.exists() and out_file.resolve().parent == Path(case_dir).resolve():
        raise FedbratsError(f"{out_file} is a file of the input case {case.case_id}; refusing "
                            f"to overwrite it even with --force")
    node_data.preflight([case], labels=labels, require_seg=False)
    sample = node_data.load_case(case)
    item = node_data.val_transforms(labels=labels)({"image": sample["image"], "label": None})
    dev = select_device(device)
    model.to(dev)
    regions = predict_regions(model, item["image"], evaluation, device=dev).numpy()
    seg = node_data.regions_to_labels(regions, labels=labels).astype(np.uint8)

    t1 = nib.load(str(case.images["t1"]))
    header = t1.header.copy()
    affine = np.asarray(sample["affine"], dtype=np.float64)
    out = nib.Nifti1Image(seg, affine, header=header)
    out.set_data_dtype(np.uint8)
    q_code = int(header["qform_code"]) if "qform_code" in header else 0
    s_code = int(header["sform_code"]) if "sform_code" in header else 0
    if q_code == 0 and s_code == 0:
        q_code = s_code = 1  # scanner-anat, as nibabel writes for a plain affine
    out.set_qform(affine, code=q_code if q_code else 0)
    out.set_sform(affine, code=s_code if s_code else 0)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"] = 0
    out.header["cal_max"] = float(seg.max()) if seg.size else 0.0
    out.header["descrip"] = f"fedbrats {meta['federation']} r{meta['round']} labels {labels}"[:79].encode()

    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp{suffix}")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        nib.save(out, str(tmp))
        os.replace(tmp, out_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FedbratsError(f"output file {out_file}: cannot write: {exc.strerror or exc}") from None
    return out_file
