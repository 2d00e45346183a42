"""Tests of node.synth: synthetic BraTS-format data from the ICBM152 2009a template.

Real NIfTI files are written under tmp_path.  Most runs use 4 mm spacing and one or two cases per
site to keep the file well under a minute on one core; one run checks the 2 mm geometry.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedbrats.errors import ConfigError, FedbratsError
from node.synth import SYNTH_VERSION, SynthResult, matches, read_result, synthesize

MODALITIES = {
    "2021": ("t1", "t1ce", "t2", "flair", "seg"),
    "2023": ("t1n", "t1c", "t2w", "t2f", "seg"),
}
SEP = {"2021": "_", "2023": "-"}
ET = {"2021": 4, "2023": 3}


def case_files(root: Path, case_id: str, labels: str) -> list[Path]:
    return [root / case_id / f"{case_id}{SEP[labels]}{m}.nii.gz" for m in MODALITIES[labels]]


def load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def ds2021_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthResult, list[str]]:
    messages: list[str] = []
    out = tmp_path_factory.mktemp("synth2021") / "data"
    result = synthesize(out, sites=2, cases_per_site=2, seed=7, spacing_mm=4.0,
                        progress=messages.append)
    return result, messages


@pytest.fixture(scope="module")
def ds2021(ds2021_run: tuple[SynthResult, list[str]]) -> SynthResult:
    return ds2021_run[0]


@pytest.fixture(scope="module")
def ds2023(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    out = tmp_path_factory.mktemp("synth2023") / "data"
    return synthesize(out, sites=3, cases_per_site=1, seed=11, labels="2023", spacing_mm=4.0)


@pytest.fixture(params=["2021", "2023"])
def dataset(request: pytest.FixtureRequest, ds2021: SynthResult,
            ds2023: SynthResult) -> tuple[str, SynthResult]:
    return request.param, {"2021": ds2021, "2023": ds2023}[request.param]


# ------------------------------------------------------------------------------------- layout


def test_layout_2021_fets_names(ds2021: SynthResult) -> None:
    root = ds2021.out_dir
    assert ds2021.case_ids == {
        "site-1": ["FeTS2022_00001", "FeTS2022_00002"],
        "site-2": ["FeTS2022_00003", "FeTS2022_00004"],
    }
    assert sorted(p.name for p in root.iterdir()) == [
        "FeTS2022_00001", "FeTS2022_00002", "FeTS2022_00003", "FeTS2022_00004",
        "partitioning_1.csv", "synth.json",
    ]
    for cid in ("FeTS2022_00001", "FeTS2022_00004"):
        assert sorted(p.name for p in (root / cid).iterdir()) == sorted(
            f"{cid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
    assert ds2021.partitioning_csv == root / "partitioning_1.csv"


def test_layout_2023_names(ds2023: SynthResult) -> None:
    root = ds2023.out_dir
    assert ds2023.case_ids == {
        "site-1": ["BraTS-GLI-00001-000"],
        "site-2": ["BraTS-GLI-00002-000"],
        "site-3": ["BraTS-GLI-00003-000"],
    }
    cid = "BraTS-GLI-00002-000"
    assert sorted(p.name for p in (root / cid).iterdir()) == sorted(
        f"{cid}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg"))


def test_progress_called_once_per_case(ds2021_run: tuple[SynthResult, list[str]]) -> None:
    messages = ds2021_run[1]
    assert len(messages) == 4
    assert messages[0].startswith("site-1: case 1/2")
    assert messages[-1].startswith("site-2: case 2/2")


def test_manifest_records_parameters(ds2021: SynthResult) -> None:
    manifest = json.loads((ds2021.out_dir / "synth.json").read_text())
    assert {k: manifest[k] for k in ("seed", "sites", "cases_per_site", "labels", "spacing_mm",
                                     "version")} == {
        "seed": 7, "sites": 2, "cases_per_site": 2, "labels": "2021", "spacing_mm": 4.0,
        "version": SYNTH_VERSION,
    }
    assert manifest["complete"] is True


# ---------------------------------------------------------------------------------- contents


def test_labels_exact_and_every_subregion_present(dataset: tuple[str, SynthResult]) -> None:
    labels, result = dataset
    expected = {0, 1, 2, ET[labels]}
    seen: set[int] = set()
    for ids in result.case_ids.values():
        for cid in ids:
            seg = load(case_files(result.out_dir, cid, labels)[-1])
            assert seg.dtype == np.uint8
            values = set(np.unique(seg).tolist())
            assert values == expected, f"{cid}: {values}"
            seen |= values
    assert seen == expected


def test_shapes_affines_and_voxel_size(dataset: tuple[str, SynthResult]) -> None:
    labels, result = dataset
    ref_shape = ref_affine = None
    for ids in result.case_ids.values():
        for cid in ids:
            imgs = [nib.load(p) for p in case_files(result.out_dir, cid, labels)]
            for img in imgs:
                assert img.shape == imgs[0].shape
                np.testing.assert_array_equal(img.affine, imgs[0].affine)
                np.testing.assert_allclose(img.header.get_zooms(), (4.0, 4.0, 4.0))
                assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
                assert int(img.header["sform_code"]) == 1
            assert [img.get_data_dtype() for img in imgs] == [np.int16] * 4 + [np.uint8]
            if ref_shape is None:
                ref_shape, ref_affine = imgs[0].shape, imgs[0].affine
            assert imgs[0].shape == ref_shape  # one grid for the whole dataset
            np.testing.assert_array_equal(imgs[0].affine, ref_affine)


def test_grid_covers_the_mni_brain(ds2021: SynthResult) -> None:
    img = nib.load(case_files(ds2021.out_dir, "FeTS2022_00001", "2021")[0])
    lo = img.affine @ np.array([0, 0, 0, 1.0])
    hi = img.affine @ np.array([*(np.array(img.shape) - 1), 1.0])
    # The MNI152 brain spans roughly x -70..70, y -105..70, z -70..80 mm.
    assert lo[0] < -68 and hi[0] > 68
    assert lo[1] < -100 and hi[1] > 68
    assert lo[2] <= -70 and hi[2] > 78


def test_images_skull_stripped_and_tumour_contrast(ds2021: SynthResult) -> None:
    root = ds2021.out_dir
    for ids in ds2021.case_ids.values():
        for cid in ids:
            t1, t1ce, t2, flair, seg = (load(p) for p in case_files(root, cid, "2021"))
            brain = t1 > 0
            assert brain.sum() > 15_000  # ~1.5 L of brain at 4 mm voxels
            assert np.all(seg[~brain] == 0)
            for img in (t1ce, t2, flair):  # one brain (non-zero) mask for every contrast
                assert np.array_equal(img > 0, brain)
            healthy = brain & (seg == 0)
            med = {name: float(np.median(img[healthy]))
                   for name, img in (("t1", t1), ("t1ce", t1ce), ("t2", t2), ("flair", flair))}
            assert t1ce[seg == 4].mean() > 1.3 * med["t1ce"], cid  # enhancing rim bright
            assert flair[seg == 2].mean() > 1.2 * med["flair"], cid  # oedema bright in FLAIR
            assert t2[seg == 2].mean() > 1.2 * med["t2"], cid  # ... and T2
            assert t1[seg == 1].mean() < 0.7 * med["t1"], cid  # necrosis dark in T1
            assert t2[seg == 1].mean() > 1.3 * med["t2"], cid  # ... and bright in T2


def test_partitioning_csv(dataset: tuple[str, SynthResult]) -> None:
    labels, result = dataset
    with result.partitioning_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["Subject_ID", "Partition_ID"]
        rows = list(reader)
    sites = len(result.case_ids)
    counts = Counter(int(r["Partition_ID"]) for r in rows)
    assert sorted(counts) == list(range(1, sites + 1))
    for pid, n in counts.items():
        assert n == len(result.case_ids[f"site-{pid}"])
    by_site = {f"site-{pid}": [r["Subject_ID"] for r in rows if int(r["Partition_ID"]) == pid]
               for pid in counts}
    assert by_site == result.case_ids
    for r in rows:
        assert (result.out_dir / r["Subject_ID"]).is_dir()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_identical_different_seed_different(ds2021: SynthResult,
                                                      tmp_path: Path) -> None:
    # Streams are per (seed, site, case): case 1 of site 1 is the same in a smaller dataset.
    again = synthesize(tmp_path / "again", sites=1, cases_per_site=1, seed=7, spacing_mm=4.0)
    other = synthesize(tmp_path / "other", sites=1, cases_per_site=1, seed=8, spacing_mm=4.0)
    cid = "FeTS2022_00001"
    triples = zip(case_files(ds2021.out_dir, cid, "2021"), case_files(again.out_dir, cid, "2021"),
                  case_files(other.out_dir, cid, "2021"))
    for a, b, c in triples:
        x, y, z = load(a), load(b), load(c)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), a.name
        np.testing.assert_array_equal(nib.load(a).affine, nib.load(b).affine)
        assert x.shape == z.shape and not np.array_equal(x, z), a.name


def test_sites_differ_in_scanner_and_cases_differ(ds2021: SynthResult) -> None:
    root = ds2021.out_dir
    segs = [load(case_files(root, cid, "2021")[-1]) for ids in ds2021.case_ids.values()
            for cid in ids]
    assert len({s.tobytes() for s in segs}) == len(segs)
    med = {}
    for site, ids in ds2021.case_ids.items():
        t2 = load(case_files(root, ids[0], "2021")[2])
        med[site] = float(np.median(t2[t2 > 0]))
    assert abs(med["site-1"] - med["site-2"]) > 0.02 * max(med.values())


# ------------------------------------------------------------------------------- 2 mm geometry


def test_two_mm_shape_and_rim_thickness(tmp_path: Path) -> None:
    result = synthesize(tmp_path / "d", sites=1, cases_per_site=2, seed=3, spacing_mm=2.0)
    for cid in result.case_ids["site-1"]:
        files = case_files(result.out_dir, cid, "2021")
        img = nib.load(files[0])
        np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 2.0))
        assert all(70 <= n <= 105 for n in img.shape), img.shape
        seg = load(files[-1])
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        # The enhancing rim is at least two voxels thick most of the way around the core.
        tc = (seg == 1) | (seg == 4)
        outer = tc & ~ndimage.binary_erosion(tc)
        to_necrosis = ndimage.distance_transform_edt(seg != 1)[outer]
        assert np.mean(to_necrosis >= 2.0) > 0.7, cid
        # Radius of the tumour core (necrosis + rim) within ~10-25 mm (irregular, so loose).
        radius_mm = (tc.sum() * 8.0 * 3 / (4 * np.pi)) ** (1 / 3)
        assert 8.0 <= radius_mm <= 32.0, radius_mm


# ---------------------------------------------------------------------------- bad arguments


def test_bad_arguments_all_listed_at_once(tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as info:
        synthesize(out, sites=0, cases_per_site=-1, seed=1, labels="2019", spacing_mm=5.0)
    err = info.value
    assert err.source == "data synth"
    assert len(err.problems) == 4
    text = str(err)
    for word in ("sites", "cases_per_site", "labels", "spacing_mm"):
        assert word in text
    assert "2019" in text and "5.0" in text
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sites": True}, "sites"),
        ({"sites": 1.5}, "sites"),
        ({"cases_per_site": "3"}, "cases_per_site"),
        ({"seed": -1}, "seed"),
        ({"spacing_mm": 0.4}, "spacing_mm"),
        ({"spacing_mm": float("nan")}, "spacing_mm"),
        ({"labels": 2021}, "labels"),
        ({"progress": "print"}, "progress"),
        ({"out_dir": None}, "out_dir"),
        ({"out_dir": ""}, "out_dir"),
    ],
)
def test_each_bad_argument_named(tmp_path: Path, kwargs: dict, field: str) -> None:
    args = {"out_dir": tmp_path / "x", "sites": 1, "cases_per_site": 1, "seed": 0,
            "labels": "2021", "spacing_mm": 4.0}
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        synthesize(**args)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(field)


# --------------------------------------------------------------------- output dir and caching


def test_refuses_foreign_non_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FedbratsError) as info:
        synthesize(out, sites=1, cases_per_site=1, seed=0, spacing_mm=4.0)
    assert not isinstance(info.value, ConfigError)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_refuses_a_file_as_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(FedbratsError, match="not a directory"):
        synthesize(out, sites=1, cases_per_site=1, seed=0, spacing_mm=4.0)


def test_rewrite_previous_output_and_matches(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    params = {"sites": 2, "cases_per_site": 1, "seed": 5, "spacing_mm": 4.0}
    assert not matches(out, **params)  # missing
    first = synthesize(out, **params)
    assert matches(out, **params)
    assert matches(out, **params, labels="2021")
    assert not matches(out, **{**params, "seed": 6})
    assert not matches(out, **{**params, "sites": 1})
    assert not matches(out, **{**params, "spacing_mm": 3.0})
    assert not matches(out, **params, labels="2023")
    assert read_result(out) == first

    # Overwriting a previous synth output is allowed; its old cases disappear.
    second = synthesize(out, sites=1, cases_per_site=1, seed=5, labels="2023", spacing_mm=4.0)
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS-GLI-00001-000", "partitioning_1.csv", "synth.json"]
    assert matches(out, sites=1, cases_per_site=1, seed=5, labels="2023", spacing_mm=4.0)
    assert not matches(out, **params)
    assert read_result(out) == second

    # A missing case file breaks the cache.
    next((out / "BraTS-GLI-00001-000").glob("*-t2f.nii.gz")).unlink()
    assert not matches(out, sites=1, cases_per_site=1, seed=5, labels="2023", spacing_mm=4.0)


def test_previous_output_with_foreign_file_refused(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    synthesize(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)
    stray = out / "FeTS2022_00001" / "mask.nii.gz"
    stray.write_bytes(b"not ours")
    with pytest.raises(FedbratsError) as info:
        synthesize(out, sites=1, cases_per_site=1, seed=6, spacing_mm=4.0)
    assert str(stray) in str(info.value)
    assert stray.exists() and (out / "FeTS2022_00001" / "FeTS2022_00001_t1.nii.gz").exists()
    assert matches(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)


def test_incomplete_previous_output_is_not_a_cache_hit_but_can_be_replaced(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    synthesize(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)
    manifest = json.loads((out / "synth.json").read_text())
    manifest["complete"] = False  # as if interrupted
    (out / "synth.json").write_text(json.dumps(manifest))
    assert not matches(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)
    with pytest.raises(FedbratsError):
        read_result(out)
    synthesize(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)
    assert matches(out, sites=1, cases_per_site=1, seed=5, spacing_mm=4.0)
