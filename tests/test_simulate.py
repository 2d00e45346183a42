"""End to end: `fedbrats simulate` starts a real aggregator and two real node processes on
127.0.0.1 for one tiny round on synthetic BraTS data, then `fedbrats predict` segments a case
with the federation's final model."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

TINY = """
[federation]
name = "tiny"
rounds = 1
sites = 2
min_sites = 2
[data.synth]
cases_per_site = 2
spacing_mm = 4.0
cache_dir = "{cache}"
[training]
local_steps = 2
patch_size = [32, 32, 32]
[evaluation]
roi_size = [32, 32, 32]
[aggregator]
join_timeout_s = 120.0
round_timeout_s = 300.0
metrics_timeout_s = 120.0
"""


def fedbrats(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fedbrats.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY.format(cache=tmp / "cache"))
    out = tmp / "out"
    proc = fedbrats("simulate", "--config", str(cfg), "--out", str(out))
    return proc, out, tmp


def test_simulate_one_tiny_round_over_grpc(tiny_run):
    proc, out, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert summary["sites"] == ["site-1", "site-2"]
    assert summary["secure_aggregation"] == "mask"  # the default
    assert summary["transport"] == "mtls"
    assert {"mode", "epsilon", "delta", "epsilon_sample", "epsilon_site"} <= set(summary["dp"])
    assert summary["dp"]["mode"] == "none" and summary["dp"]["epsilon"] is None
    assert set(summary["dice"]) == {"wt", "tc", "et", "mean"}
    assert all(0.0 <= summary["dice"][k] <= 1.0 for k in summary["dice"])
    assert summary["wall_seconds"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((x["round"], x["site"]) for x in lines) == [(1, "site-1"), (1, "site-2")]
    for name in ("aggregator", "site-1", "site-2"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    agg_log = (out / "logs" / "aggregator.log").read_text()
    assert "round 1 stage unmask: unmasking the sum of 2 masked input(s)" in agg_log
    assert "round 1 stage aggregating: aggregated 2 update(s)" in agg_log
    assert (out / "final_model.pt").exists()
    assert (out / "checkpoints" / "round-0001.pt").exists()
    assert "round 1/1" in proc.stdout  # progress was shown


def test_predict_writes_brats_labels_with_input_affine(tiny_run):
    proc, out, tmp = tiny_run
    assert proc.returncode == 0
    data_root = next((tmp / "cache").iterdir())
    case = sorted(p for p in data_root.iterdir() if p.is_dir())[0]
    seg_out = tmp / "pred.nii.gz"
    res = fedbrats("predict", "--model", str(out / "final_model.pt"), "--case", str(case),
                   "--out", str(seg_out))
    assert res.returncode == 0, res.stderr
    pred = nib.load(seg_out)
    t1 = nib.load(next(case.glob("*_t1.nii.gz")))
    assert pred.shape == t1.shape
    np.testing.assert_allclose(pred.affine, t1.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_node_preflight_failure_names_the_file_and_exits_3(tiny_run, tmp_path):
    _, _, tmp = tiny_run
    src = next((tmp / "cache").iterdir())
    import shutil

    data = tmp_path / "data"
    shutil.copytree(src, data)
    import csv

    with open(data / "partitioning_1.csv", newline="") as f:
        site1 = [r["Subject_ID"] for r in csv.DictReader(f) if r["Partition_ID"] == "1"]
    case = data / site1[0]
    flair = next(case.glob("*_flair.nii.gz"))
    raw = flair.read_bytes()
    flair.write_bytes(raw[: len(raw) // 2])
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[federation]\nsecure_aggregation = "none"\n'
                   f'[data]\nroot = "{data}"\n[node]\nsite_id = "site-1"\n'
                   f'aggregator = "127.0.0.1:9"\nconnect_timeout_s = 1.0\n')
    res = fedbrats("node", "--config", str(cfg), "--insecure", timeout=300)
    assert res.returncode == 3, res.stderr
    assert flair.name in res.stderr and case.name in res.stderr
    assert "Traceback" not in res.stderr


def test_simulate_refuses_to_overwrite_a_previous_run_without_force(tiny_run):
    proc, out, tmp = tiny_run
    assert proc.returncode == 0
    before = (out / "summary.json").read_bytes()
    res = fedbrats("simulate", "--config", str(tmp / "tiny.toml"), "--out", str(out), timeout=120)
    assert res.returncode == 1 and "--force" in res.stderr
    assert (out / "summary.json").read_bytes() == before  # nothing lost


def test_summary_reports_epsilon_charged_by_a_failed_round(tmp_path):
    """A round charged to the ledger but never finished still shows in summary.json's ε."""
    from fedbrats.config import Config, DPConfig
    from fedbrats.simulate import summarize
    from node.accounting import SAMPLE_STATE_FILE, SampleLevelAccountant

    (tmp_path / "sites" / "site-1").mkdir(parents=True)
    acc = SampleLevelAccountant(site="site-1", delta=1e-5)
    acc.step(1.0, 0.1, 30)
    acc.save(tmp_path / "sites" / "site-1" / SAMPLE_STATE_FILE)
    cfg = Config(dp=DPConfig(mode=("dp-sgd",)))
    summary = summarize(tmp_path, cfg, 1.0)  # no metrics.jsonl: nothing was reported
    assert summary["rounds_completed"] == 0
    assert summary["dp"]["epsilon_sample"] == pytest.approx(acc.epsilon(1e-5), abs=1e-4)  # 4 decimals
    assert summary["dp"]["epsilon"] == summary["dp"]["epsilon_sample"] > 0
    assert summary["dp"]["delta"] == 1e-5
