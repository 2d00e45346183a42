"""End to end: `experiment compare` runs real federations (none, mask) on tiny synthetic data,
attacks what the aggregator received and writes report.md, results.csv and the plots."""

import csv
import json

import pytest

from experiments import compare as cmp
from experiments.report import CSV_COLUMNS

TINY = """
[federation]
name = "tiny-experiment"
rounds = 1
sites = 2
min_sites = 2
[data.synth]
cases_per_site = 2
spacing_mm = 4.0
cache_dir = "{cache}"
[training]
local_steps = 2
patch_size = [16, 16, 16]
[evaluation]
roi_size = [48, 56, 48]
[experiment]
extra_cases_per_site = 1
heldout_cases = 2
inversion_patch = 8
inversion_hidden = 8
inversion_steps = 20
attack_threads = 1
"""


def test_experiment_settings_are_validated(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[experiment]\nconfigurations = ['none', 'nonsense']\ninversion_steps = 0\n"
                 "colour = 'blue'\n")
    with pytest.raises(Exception) as err:
        cmp.load_experiment(p)
    text = str(err.value)
    assert "nonsense" in text and "inversion_steps" in text and "colour" in text


def test_default_config_loads_and_defines_every_configuration(tmp_path):
    cfg, settings = cmp.load_experiment(None)
    assert cfg.federation.sites == 3
    assert settings.configurations == cmp.CONFIGURATIONS
    for name in cmp.CONFIGURATIONS:
        c = cmp.configuration_config(cfg, name, settings, tmp_path / name)
        assert c.aggregator.record_dir == str(tmp_path / name / "received")
    assert cmp.configuration_config(cfg, "dp+secagg", settings, tmp_path).dp.mode == (
        "dp-sgd", "site-distributed")
    assert cmp.configuration_config(cfg, "secagg-ckks", settings,
                                    tmp_path).federation.secure_aggregation == "ckks"


def test_dp_sweep_adds_points_of_the_privacy_utility_curve(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text("[experiment]\nconfigurations = ['none', 'dp+secagg']\ndp_sweep = [0.5, 2]\n")
    cfg, settings = cmp.load_experiment(p)
    names = cmp.all_configurations(settings)
    assert names == ["none", "dp+secagg", "dp+secagg@0.5", "dp+secagg@2"]
    assert sorted(names, key=cmp.order_key) == ["none", "dp+secagg", "dp+secagg@2", "dp+secagg@0.5"]
    c = cmp.configuration_config(cfg, "dp+secagg@0.5", settings, tmp_path)
    assert c.dp.noise_multiplier == 0.5 and c.dp.site_noise_multiplier == 0.5
    assert c.dp.mode == ("dp-sgd", "site-distributed")
    with pytest.raises(Exception, match="unknown configuration"):
        cmp.configuration("dp+secagg@-1", settings)
    p.write_text("[experiment]\ndp_sweep = [0]\n")
    with pytest.raises(Exception, match="dp_sweep"):
        cmp.load_experiment(p)


def test_privacy_spent_reads_the_summary_and_reports_unknown_as_none(tmp_path):
    got = cmp.privacy_spent({"dp": {"mode": "dp-sgd+site-distributed", "epsilon_sample": 3.5,
                                    "epsilon_site": 9.0, "delta_sample": 1e-5}}, tmp_path,
                            ("dp-sgd", "site-distributed"))
    assert got["applied"] and got["mode"] == ["dp-sgd", "site-distributed"]
    assert got["epsilon_sample"] == 3.5 and got["epsilon_site"] == 9.0
    none = cmp.privacy_spent({"dp": {"mode": "none", "epsilon": None}}, tmp_path, ("dp-sgd",))
    assert not none["applied"] and none["epsilon_sample"] is None and none["epsilon_site"] is None
    assert cmp.privacy_spent({}, tmp_path, ())["epsilon_site"] is None


@pytest.mark.slow
def test_compare_none_and_mask_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "exp"
    lines: list[str] = []
    report = cmp.compare(cfg, out, configurations=["secagg-mask", "none"], progress=lines.append)
    assert report == out / "report.md"
    text = report.read_text()
    for col in ("Dice WT", "Dice TC", "Dice ET", "Dice mean", "ε sample", "ε site",
                "inversion SSIM", "inversion PSNR", "MIA AUC", "property acc", "MB / round",
                "time (s)"):
        assert col in text
    assert "| none |" in text and "| secagg-mask |" in text
    assert "the unmasked weighted mean of all sites" in text  # says what the attack ran on
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == CSV_COLUMNS
    assert [r["configuration"] for r in rows] == ["none", "secagg-mask"]
    for r in rows:
        assert r["status"] == "ok"
        assert 0.0 <= float(r["dice_mean"]) <= 1.0
        assert r["epsilon_sample"] == "" and r["epsilon_site"] == ""  # no DP: n/a
        assert float(r["mb_per_round"]) > 0
        assert 0.0 <= float(r["mia_auc"]) <= 1.0
        assert -1.0 <= float(r["inversion_ssim"]) <= 1.0
    # What the aggregator received is kept: plaintext updates vs masked vectors.
    assert list((out / "none" / "received" / "round-0001").glob("site-1-training.npz"))
    assert list((out / "secagg-mask" / "received" / "round-0001").glob("site-1-masked_input.npz"))
    for png in ("privacy_utility.png", "attack_success.png", "reconstructions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "secagg-mask" / "results.json").read_text())
    assert res["property"]["accuracy"] == pytest.approx(0.5)  # a sum of 2 sites: a guess
    assert set(res["inversion_sweep"]) == {"0", "1"}
    # A second call reuses the federations and the attack results.
    lines.clear()
    cmp.compare(cfg, out, configurations=["none"], progress=lines.append)
    assert any("reusing the federation" in ln for ln in lines)
    assert any("reusing the attack results" in ln for ln in lines)
