"""The CLI refuses bad environment settings at start-up (before any daemon trains)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fedbrats.cli import main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.toml")


@pytest.mark.parametrize("command", [["simulate", "--out", "OUT"], ["aggregator", "--config", DEMO],
                                     ["node", "--config", DEMO]])
@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_bad_crypto_threads_refused_at_start_up(command, value, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FEDBRATS_CRYPTO_THREADS", value)
    argv = [a.replace("OUT", str(tmp_path / "run")) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "environment: 1 configuration problem" in err
    assert "FEDBRATS_CRYPTO_THREADS must be" in err and value in err
    assert not (tmp_path / "run").exists()  # nothing was started or written
