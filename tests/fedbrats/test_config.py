"""Config loading: every problem at once, named by file and field; the demo file equals the defaults."""

from pathlib import Path

import pytest

from fedbrats.config import Config, config_from_dict, load_config, to_toml, with_overrides
from fedbrats.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_demo_toml_equals_embedded_defaults_except_its_dp_section():
    from dataclasses import replace

    from fedbrats.config import DPConfig

    demo = load_config(ROOT / "configs" / "demo.toml")
    assert replace(demo, dp=DPConfig()) == Config()
    assert demo.dp.mode == ("dp-sgd", "site-distributed")
    assert Config().dp.mode == ()  # DP is opt-in outside the demo


def test_round_trip_through_toml(tmp_path):
    cfg = with_overrides(Config(), federation={"rounds": 7}, training={"patch_size": [32, 32, 32]})
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(
        '[federation]\nrounds = 0\nsecure_aggregation = "rot13"\ntypo = 1\n'
        '[training]\nlocal_steps = "many"\npatch_size = [48, 48]\n'
        '[data]\nlabels = "2019"\n'
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    for field in ("federation.rounds", "federation.secure_aggregation", "federation.typo",
                  "training.local_steps", "training.patch_size", "data.labels"):
        assert field in msg, field
    assert len(ei.value.problems) == 6


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "broken.toml"
    p.write_text("[federation\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_min_sites_cannot_exceed_sites():
    with pytest.raises(ConfigError, match="federation.min_sites"):
        config_from_dict({"federation": {"sites": 2, "min_sites": 3}})


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.federation.rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, 10.0])
def test_final_learning_rate_ratio_outside_0_1_is_refused(tmp_path, ratio):
    p = tmp_path / "lr.toml"
    p.write_text(f"[training]\nfinal_learning_rate_ratio = {ratio}\n")
    with pytest.raises(ConfigError, match=r"training.final_learning_rate_ratio: must be in \(0, 1\]"):
        load_config(p)
