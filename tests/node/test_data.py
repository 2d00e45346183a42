"""Tests of node.data: discovery, preflight (K01, K02), loading, label regions and transforms.

Every test writes its own small NIfTI files to ``tmp_path``; nothing is read from shared data.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedbrats.errors import ConfigError, DataError, DataProblem
from node.data import (
    LABEL_CONVENTIONS,
    MODALITIES,
    REGIONS,
    Case,
    discover_sites,
    labels_to_regions,
    load_case,
    preflight,
    regions_to_labels,
    split_cases,
    train_transforms,
    val_transforms,
)

SHAPE = (24, 24, 20)
AFFINE = np.array(
    [[-1.0, 0, 0, 120.0], [0, -1.0, 0, 120.0], [0, 0, 1.0, -70.0], [0, 0, 0, 1.0]]
)
DISK_NAMES = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}),
}


def brain(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A positive 'head' block surrounded by exactly-zero background."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    inner = (shape[0] - 6, shape[1] - 6, shape[2] - 4)
    vol[3:-3, 3:-3, 2:-2] = rng.uniform(100.0, 1000.0, size=inner)
    return vol


def tumour(et_label: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, dict[str, int]]:
    """A label map with disjoint blocks of 1, 2 and ET, and the hand-counted region sizes."""
    seg = np.zeros(shape, np.uint8)
    seg[5:7, 5:7, 5:7] = 1  # 8 voxels necrosis
    seg[9:12, 9:12, 9:12] = 2  # 27 voxels oedema
    seg[14:18, 14:16, 10:11] = et_label  # 8 voxels enhancing
    return seg, {"tc": 8 + 8, "wt": 8 + 27 + 8, "et": 8}


def path_of(case_dir: Path, layout: str, modality: str, ext: str = ".nii.gz") -> Path:
    sep, names = DISK_NAMES[layout]
    name = "seg" if modality == "seg" else names[modality]
    return case_dir / f"{case_dir.name}{sep}{name}{ext}"


def write_case(
    parent: Path,
    case_id: str,
    *,
    layout: str = "2021",
    seg: np.ndarray | None | str = "auto",
    ext: str = ".nii.gz",
    shape: tuple[int, int, int] = SHAPE,
    skip: tuple[str, ...] = (),
    volumes: dict[str, np.ndarray] | None = None,
    affines: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write one BraTS case folder; returns it."""
    case_dir = parent / case_id
    case_dir.mkdir(parents=True)
    volumes = volumes or {}
    affines = affines or {}
    for i, m in enumerate(MODALITIES):
        if m in skip:
            continue
        vol = volumes.get(m, brain(seed=i, shape=shape))
        nib.save(nib.Nifti1Image(vol, affines.get(m, AFFINE)), path_of(case_dir, layout, m, ext))
    if isinstance(seg, str):
        seg = tumour(LABEL_CONVENTIONS[layout][-1], shape)[0]
    if seg is not None:
        img = nib.Nifti1Image(seg, affines.get("seg", AFFINE))
        img.set_data_dtype(seg.dtype)
        nib.save(img, path_of(case_dir, layout, "seg", ext))
    return case_dir


def case_of(case_dir: Path, layout: str = "2021", site: str = "s", ext: str = ".nii.gz") -> Case:
    """The Case of a folder written by :func:`write_case` (without going through discovery)."""
    images = {m: path_of(case_dir, layout, m, ext) for m in MODALITIES}
    seg = path_of(case_dir, layout, "seg", ext)
    return Case(
        case_dir.name,
        site,
        {m: p for m, p in images.items() if p.exists()},
        seg if seg.exists() else None,
    )


def problems_of(exc: DataError) -> list[DataProblem]:
    return [p for p in exc.problems if isinstance(p, DataProblem)]


# ------------------------------------------------------------------------------ discovery


def test_discover_per_site_folders_both_layouts_and_plain_nii(tmp_path: Path) -> None:
    write_case(tmp_path / "site-a", "BraTS2021_00001")
    write_case(tmp_path / "site-a", "BraTS2021_00000", seg=None)
    write_case(tmp_path / "site-b", "BraTS-GLI-00002-000", layout="2023", ext=".nii")
    (tmp_path / "README.txt").write_text("not a site")
    (tmp_path / ".cache").mkdir()

    sites = discover_sites(tmp_path)

    assert list(sites) == ["site-a", "site-b"]
    assert [c.case_id for c in sites["site-a"]] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert sites["site-a"][0].seg is None
    a = sites["site-a"][1]
    assert a.site_id == "site-a"
    assert set(a.images) == set(MODALITIES)
    assert a.images["t1ce"].name == "BraTS2021_00001_t1ce.nii.gz"
    assert a.seg is not None and a.seg.name == "BraTS2021_00001_seg.nii.gz"
    b = sites["site-b"][0]
    assert {m: p.name for m, p in b.images.items()} == {
        "t1": "BraTS-GLI-00002-000-t1n.nii",
        "t1ce": "BraTS-GLI-00002-000-t1c.nii",
        "t2": "BraTS-GLI-00002-000-t2w.nii",
        "flair": "BraTS-GLI-00002-000-t2f.nii",
    }
    assert b.seg is not None and b.seg.name == "BraTS-GLI-00002-000-seg.nii"


def test_discover_partitioning_csv_columns_by_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for cid in ("FeTS2022_00000", "FeTS2022_00001", "FeTS2022_00002"):
        write_case(data, cid)
    csv_path = tmp_path / "partitioning_2.csv"
    csv_path.write_text(
        "Notes,Subject_ID,Partition_ID\n"
        "x,FeTS2022_00002,10\n"
        "y,FeTS2022_00000,2\n"
        "z,FeTS2022_00001,2\n"
    )

    sites = discover_sites(data, partitioning=csv_path)

    assert list(sites) == ["site-2", "site-10"]
    assert [c.case_id for c in sites["site-2"]] == ["FeTS2022_00000", "FeTS2022_00001"]
    assert [c.case_id for c in sites["site-10"]] == ["FeTS2022_00002"]
    assert all(c.site_id == "site-2" for c in sites["site-2"])


def test_discover_uses_partitioning_1_csv_in_root(tmp_path: Path) -> None:
    write_case(tmp_path, "FeTS2022_00000")
    write_case(tmp_path, "FeTS2022_00001")
    (tmp_path / "partitioning_1.csv").write_text(
        "Partition_ID,Subject_ID\n1,FeTS2022_00000\n3,FeTS2022_00001\n"
    )
    sites = discover_sites(tmp_path)
    assert {k: [c.case_id for c in v] for k, v in sites.items()} == {
        "site-1": ["FeTS2022_00000"],
        "site-3": ["FeTS2022_00001"],
    }


def test_partitioning_missing_column_is_config_error_naming_csv(tmp_path: Path) -> None:
    write_case(tmp_path / "data", "FeTS2022_00000")
    csv_path = tmp_path / "parts.csv"
    csv_path.write_text("Subject,Partition_ID\nFeTS2022_00000,1\n")
    with pytest.raises(ConfigError) as info:
        discover_sites(tmp_path / "data", partitioning=csv_path)
    assert str(csv_path) in str(info.value)
    assert "Subject_ID" in str(info.value)


def test_partitioning_subject_without_folder_names_csv_and_line(tmp_path: Path) -> None:
    write_case(tmp_path / "data", "FeTS2022_00000")
    csv_path = tmp_path / "parts.csv"
    csv_path.write_text("Partition_ID,Subject_ID\n1,FeTS2022_00000\n1,FeTS2022_00099\n2,\n")
    # The empty Subject_ID on line 4 is a configuration problem, reported first.
    with pytest.raises(ConfigError) as info:
        discover_sites(tmp_path / "data", partitioning=csv_path)
    assert "line 4" in str(info.value) and str(csv_path) in str(info.value)

    csv_path.write_text("Partition_ID,Subject_ID\n1,FeTS2022_00000\n1,FeTS2022_00099\n")
    with pytest.raises(DataError) as info:
        discover_sites(tmp_path / "data", partitioning=csv_path)
    msg = str(info.value)
    assert "FeTS2022_00099" in msg and str(csv_path) in msg and "line 3" in msg


def test_discover_reports_empty_site_and_case_without_files(tmp_path: Path) -> None:
    write_case(tmp_path / "site-a", "BraTS2021_00001")
    (tmp_path / "site-empty").mkdir()
    (tmp_path / "site-c" / "BraTS2021_00007").mkdir(parents=True)
    (tmp_path / "site-c" / "BraTS2021_00007" / "notes.txt").write_text("")
    with pytest.raises(DataError) as info:
        discover_sites(tmp_path)
    msg = str(info.value)
    assert len(info.value.problems) == 2
    assert "site-empty" in msg and "no case folders" in msg
    assert "BraTS2021_00007" in msg and "no BraTS image files" in msg


# ------------------------------------------------------------------------------ K01 labels


def test_k01_2023_seg_in_2021_federation_fails_preflight(tmp_path: Path) -> None:
    write_case(tmp_path / "site-a", "BraTS2021_00001", layout="2021")
    write_case(tmp_path / "site-b", "BraTS-GLI-00005-000", layout="2023")
    sites = discover_sites(tmp_path)

    preflight(sites["site-a"], labels="2021")  # site A is fine
    with pytest.raises(DataError) as info:
        preflight(sites["site-b"], labels="2021")

    (problem,) = problems_of(info.value)
    seg = tmp_path / "site-b" / "BraTS-GLI-00005-000" / "BraTS-GLI-00005-000-seg.nii.gz"
    assert problem.case_id == "BraTS-GLI-00005-000"
    assert problem.path == str(seg)
    msg = str(info.value)
    assert seg.name in msg
    assert "found labels {0, 1, 2, 3}" in msg
    assert "unexpected {3}" in msg
    assert "expected labels {0, 1, 2, 4}" in msg


def test_k01_2021_seg_in_2023_federation_fails_preflight(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path, "BraTS2021_00001", layout="2021")
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2023")
    msg = str(info.value)
    assert "BraTS2021_00001_seg.nii.gz" in msg
    assert "found labels {0, 1, 2, 4}" in msg and "unexpected {4}" in msg
    assert "expected labels {0, 1, 2, 3}" in msg


@pytest.mark.parametrize("labels", ["2021", "2023"])
def test_k01_region_counts_equal_hand_counts(tmp_path: Path, labels: str) -> None:
    case_dir = write_case(tmp_path, "case0", layout=labels)
    case = case_of(case_dir, layout=labels)
    preflight([case], labels=labels)
    sample = load_case(case)
    _, hand = tumour(LABEL_CONVENTIONS[labels][-1])

    regions = labels_to_regions(sample["label"], labels=labels)
    assert regions.shape == (3, *SHAPE) and regions.dtype == np.uint8
    assert {r: int(regions[i].sum()) for i, r in enumerate(REGIONS)} == hand

    out = val_transforms(labels=labels)(sample)
    assert out["label"].shape == (3, *SHAPE)
    assert {r: int(out["label"][i].sum()) for i, r in enumerate(REGIONS)} == hand


def test_labels_to_regions_rejects_labels_outside_convention() -> None:
    seg = np.zeros((4, 4, 4), np.uint8)
    seg[0, 0, 0] = 3
    with pytest.raises(DataError, match=r"\{3\}"):
        labels_to_regions(seg, labels="2021")
    with pytest.raises(ConfigError):
        labels_to_regions(seg, labels="2020")


@settings(max_examples=60, deadline=None)
@given(
    labels=st.sampled_from(sorted(LABEL_CONVENTIONS)),
    data=st.data(),
)
def test_regions_to_labels_inverts_labels_to_regions(labels: str, data: st.DataObject) -> None:
    shape = data.draw(st.tuples(*[st.integers(1, 6)] * 3))
    seg = data.draw(arrays(np.uint8, shape, elements=st.sampled_from(LABEL_CONVENTIONS[labels])))
    regions = labels_to_regions(seg, labels=labels)
    # Regions are nested: ET within TC within WT.
    assert np.all(regions[2] <= regions[0]) and np.all(regions[0] <= regions[1])
    back = regions_to_labels(regions.astype(bool), labels=labels)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, seg)


def test_regions_to_labels_precedence_for_non_nested_masks() -> None:
    regions = np.zeros((3, 4, 1, 1), bool)
    regions[1, :] = True  # WT everywhere
    regions[0, 1:] = True  # TC on voxels 1..3
    regions[2, 2:] = True  # ET on voxels 2..3
    regions[1, 3] = False  # ET outside WT still wins
    assert regions_to_labels(regions, labels="2021").ravel().tolist() == [2, 1, 4, 4]
    assert regions_to_labels(regions, labels="2023").ravel().tolist() == [2, 1, 3, 3]


# ------------------------------------------------------------------------------ K02 NIfTI


def test_k02a_scaled_int16_loads_as_float32_within_1e_4(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path, "BraTS2021_00003")
    rng = np.random.default_rng(3)
    raw = rng.integers(-2000, 30000, size=SHAPE, dtype=np.int16)
    img = nib.Nifti1Image(raw, AFFINE)
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.0616, 1839.87)
    nib.save(img, path_of(case_dir, "2021", "t1"))
    stored = nib.load(path_of(case_dir, "2021", "t1"))
    assert stored.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj.get_unscaled()), raw)

    case = case_of(case_dir)
    preflight([case], labels="2021")
    sample = load_case(case)

    t1 = sample["image"][MODALITIES.index("t1")]
    assert sample["image"].dtype == np.float32
    assert sample["image"].shape == (4, *SHAPE)
    slope, inter = stored.dataobj.slope, stored.dataobj.inter  # as stored (float32) in the header
    expected = raw.astype(np.float64) * float(slope) + float(inter)
    np.testing.assert_allclose(t1, expected, rtol=1e-4)
    assert abs(float(slope) - 0.0616) < 1e-6 and abs(float(inter) - 1839.87) < 1e-3
    assert sample["affine"].dtype == np.float64
    np.testing.assert_allclose(sample["affine"], AFFINE)
    assert sample["label"].dtype == np.uint8 and sample["label"].shape == SHAPE
    assert sample["case_id"] == "BraTS2021_00003"


def test_k02b_all_zero_t2_names_case_and_modality(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path, "BraTS2021_00004", volumes={"t2": np.zeros(SHAPE, np.float32)})
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.case_id == "BraTS2021_00004"
    assert problem.path.endswith("BraTS2021_00004_t2.nii.gz")
    assert "empty modality 't2'" in problem.reason and "BraTS2021_00004" in str(info.value)


def test_constant_and_non_finite_modalities_are_errors(tmp_path: Path) -> None:
    nan_flair = brain(seed=9)
    nan_flair[10, 10, 10] = np.nan
    case_dir = write_case(
        tmp_path,
        "c1",
        volumes={"t1ce": np.full(SHAPE, 7.0, np.float32), "flair": nan_flair},
    )
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    reasons = {Path(p.path).name: p.reason for p in problems_of(info.value)}
    assert "empty modality 't1ce'" in reasons["c1_t1ce.nii.gz"]
    assert "non-finite" in reasons["c1_flair.nii.gz"] and "1 " in reasons["c1_flair.nii.gz"]


def test_k02b_background_exactly_zero_after_val_transforms(tmp_path: Path) -> None:
    case = case_of(write_case(tmp_path, "c0"))
    sample = load_case(case)
    raw = sample["image"].copy()
    out = val_transforms(labels="2021")(sample)

    image = out["image"]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.shape == (4, *SHAPE)
    arr = image.numpy()
    background = raw == 0
    assert background.any()
    assert np.all(arr[background] == 0.0)
    assert np.all(np.isfinite(arr))
    for c in range(4):  # channel-wise z-score over the non-zero voxels
        fg = arr[c][~background[c]]
        assert abs(float(fg.mean())) < 1e-4 and abs(float(fg.std()) - 1.0) < 1e-3
    np.testing.assert_array_equal(sample["image"], raw)  # the input sample is not modified


def test_unlabelled_case_loads_and_validates(tmp_path: Path) -> None:
    case = case_of(write_case(tmp_path, "c0", seg=None))
    assert case.seg is None
    preflight([case], labels="2023", require_seg=False)  # as predict does
    with pytest.raises(DataError, match="no segmentation file"):
        preflight([case], labels="2023")  # training and validation need one
    sample = load_case(case)
    assert sample["label"] is None
    out = val_transforms(labels="2023")(sample)
    assert out["label"] is None and out["image"].shape == (4, *SHAPE)
    with pytest.raises(DataError, match="segmentation"):
        train_transforms((16, 16, 16), labels="2023", seed=0)(sample)


# ------------------------------------------------------------------------------ preflight


def test_missing_modality_names_expected_file(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path / "site", "BraTS-GLI-00001-000", layout="2023", skip=("flair",))
    (case,) = discover_sites(tmp_path)["site"]
    assert "flair" not in case.images
    with pytest.raises(DataError) as info:
        preflight([case], labels="2023")
    (problem,) = problems_of(info.value)
    expected = case_dir / "BraTS-GLI-00001-000-t2f.nii.gz"
    assert problem.path == str(expected)
    assert "missing modality 'flair'" in problem.reason and str(expected) in problem.reason
    with pytest.raises(DataError, match="flair"):
        load_case(case)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_file_is_named(tmp_path: Path, ext: str) -> None:
    case_dir = write_case(tmp_path, "BraTS2021_00010", ext=ext)
    t1ce = path_of(case_dir, "2021", "t1ce", ext)
    blob = t1ce.read_bytes()
    t1ce.write_bytes(blob[: len(blob) // 2])
    case = case_of(case_dir, ext=ext)

    with pytest.raises(DataError) as info:
        preflight([case], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.path == str(t1ce)
    assert problem.reason.startswith("truncated or unreadable")
    assert t1ce.name in str(info.value)
    with pytest.raises(DataError, match="truncated or unreadable"):
        load_case(case)


def test_gz_cut_inside_the_trailer_is_reported(tmp_path: Path) -> None:
    # The voxel data is all there; only the gzip CRC/length trailer is cut.
    case_dir = write_case(tmp_path, "c0")
    flair = path_of(case_dir, "2021", "flair")
    flair.write_bytes(flair.read_bytes()[:-4])
    assert nib.load(flair).get_fdata().shape == SHAPE  # nibabel alone does not notice
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.path == str(flair) and "truncated or unreadable" in problem.reason


def test_corrupt_gzip_stream_is_reported(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path, "c0")
    seg = path_of(case_dir, "2021", "seg")
    blob = bytearray(seg.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 16] = b"\xff" * 16
    seg.write_bytes(bytes(blob))
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.path == str(seg) and "truncated or unreadable" in problem.reason


def test_shape_mismatch_names_both_files_and_shapes(tmp_path: Path) -> None:
    case_dir = write_case(tmp_path, "c0", volumes={"t2": brain(shape=(24, 24, 18))})
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.path.endswith("c0_t2.nii.gz")
    assert "c0_t2.nii.gz" in problem.reason and "c0_t1.nii.gz" in problem.reason
    assert "(24, 24, 18)" in problem.reason and "(24, 24, 20)" in problem.reason


def test_affine_mismatch_names_both_files(tmp_path: Path) -> None:
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    nearly = AFFINE.copy()
    nearly[1, 3] += 5e-4  # within tolerance
    case_dir = write_case(tmp_path, "c0", affines={"seg": shifted, "flair": nearly})
    with pytest.raises(DataError) as info:
        preflight([case_of(case_dir)], labels="2021")
    (problem,) = problems_of(info.value)
    assert problem.path.endswith("c0_seg.nii.gz")
    assert "affine mismatch" in problem.reason
    assert "c0_seg.nii.gz" in problem.reason and "c0_t1.nii.gz" in problem.reason


def test_non_integral_seg_is_error(tmp_path: Path) -> None:
    seg = tumour(4)[0].astype(np.float32)
    seg[0, 0, 0] = 0.5
    case_dir = write_case(tmp_path, "c0", seg=seg)
    with pytest.raises(DataError, match="non-integer"):
        preflight([case_of(case_dir)], labels="2021")


def test_all_problems_of_all_cases_in_one_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_case(site, "BraTS2021_00001", skip=("t1",))  # missing modality
    write_case(site, "BraTS2021_00002", volumes={"t2": np.zeros(SHAPE, np.float32)},
               seg=tumour(3)[0])  # empty t2 + labels of the other convention
    bad = write_case(site, "BraTS2021_00003")  # truncated flair
    flair = path_of(bad, "2021", "flair")
    flair.write_bytes(flair.read_bytes()[:100])
    write_case(site, "BraTS2021_00004")  # fine
    cases = discover_sites(tmp_path)["site"]

    with pytest.raises(DataError) as info:
        preflight(cases, labels="2021")

    found = sorted((p.case_id, Path(p.path).name) for p in problems_of(info.value))
    assert found == [
        ("BraTS2021_00001", "BraTS2021_00001_t1.nii.gz"),
        ("BraTS2021_00002", "BraTS2021_00002_seg.nii.gz"),
        ("BraTS2021_00002", "BraTS2021_00002_t2.nii.gz"),
        ("BraTS2021_00003", "BraTS2021_00003_flair.nii.gz"),
    ]
    assert "4 problem(s)" in str(info.value)


def test_preflight_rejects_unknown_convention(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        preflight([], labels="2019")


# ------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("labels", ["2021", "2023"])
def test_train_transforms_patch_shape_and_determinism(tmp_path: Path, labels: str) -> None:
    sample = load_case(case_of(write_case(tmp_path, "c0", layout=labels), layout=labels))
    raw = sample["image"].copy()
    patch = (16, 16, 8)

    outs = [train_transforms(patch, labels=labels, seed=7)(sample) for _ in range(2)]
    for out in outs:
        assert isinstance(out, dict)
        assert out["image"].shape == (4, *patch) and out["image"].dtype == torch.float32
        assert out["label"].shape == (3, *patch) and out["label"].dtype == torch.float32
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        assert out["case_id"] == "c0"
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["label"], outs[1]["label"])
    np.testing.assert_array_equal(sample["image"], raw)

    pipeline = train_transforms(patch, labels=labels, seed=1)
    with_tumour = sum(bool(pipeline(sample)["label"][1].any()) for _ in range(10))
    assert with_tumour >= 3  # about half the patches are centred on the tumour (pos:neg 1:1)


def test_train_transforms_pads_small_volumes(tmp_path: Path) -> None:
    sample = load_case(case_of(write_case(tmp_path, "c0")))
    out = train_transforms((32, 32, 32), labels="2021", seed=0)(sample)
    assert out["image"].shape == (4, 32, 32, 32)
    assert out["label"].shape == (3, 32, 32, 32)
    _, hand = tumour(4)
    assert int(out["label"][1].sum()) == hand["wt"]  # the whole volume fits in the patch


def test_train_transforms_rejects_bad_patch_size() -> None:
    with pytest.raises(ConfigError):
        train_transforms((16, 16), labels="2021", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        train_transforms((16, 0, 16), labels="2021", seed=0)


# ------------------------------------------------------------------------------ split


def _cases(n: int) -> list[Case]:
    return [Case(f"case{i:03d}", "s", {}, None) for i in range(n)]


def test_split_cases_deterministic_and_order_independent() -> None:
    cases = _cases(20)
    train, val = split_cases(cases, val_fraction=0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in cases}
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    again = split_cases(list(reversed(cases)), val_fraction=0.2, seed=3)
    assert again == (train, val)
    other = split_cases(cases, val_fraction=0.2, seed=4)
    assert other != (train, val)


def test_split_cases_edge_sizes() -> None:
    assert [len(x) for x in split_cases(_cases(2), val_fraction=0.01, seed=0)] == [1, 1]
    assert [len(x) for x in split_cases(_cases(3), val_fraction=0.9, seed=0)] == [1, 2]
    assert [len(x) for x in split_cases(_cases(1), val_fraction=0.5, seed=0)] == [1, 0]
    assert [len(x) for x in split_cases(_cases(5), val_fraction=0.0, seed=0)] == [5, 0]
    with pytest.raises(ConfigError):
        split_cases(_cases(5), val_fraction=1.0, seed=0)


def test_a_site_sees_only_its_own_data_and_gets_discovery_and_preflight_problems_together(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    write_case(root / "site-1", "A1")
    write_case(root / "site-1", "A2", skip=("flair",))  # a preflight problem
    (root / "site-1" / "EMPTY").mkdir()  # a discovery problem
    (root / "site-2" / "JUNK").mkdir(parents=True)  # another site's problem: not ours
    found: list[DataProblem] = []
    sites = discover_sites(root, site="site-1", problems_out=found)
    assert list(sites) == ["site-1"] and [c.case_id for c in sites["site-1"]] == ["A1", "A2"]
    assert len(found) == 1 and "EMPTY" in found[0].path
    with pytest.raises(DataError) as ei:
        preflight(sites["site-1"], labels="2021", known_problems=found)
    msg = str(ei.value)
    assert "EMPTY" in msg and "A2" in msg and "flair" in msg and "JUNK" not in msg
    # A shared partitioning csv may list other sites' subjects that are not on this disk.
    flat = tmp_path / "flat"
    write_case(flat, "S1")
    (flat / "parts.csv").write_text("Subject_ID,Partition_ID\nS1,1\nS9,2\n")
    mine = discover_sites(flat, partitioning=flat / "parts.csv", site="site-1")
    assert [c.case_id for c in mine["site-1"]] == ["S1"]
