"""Case K11: the aggregator is killed (SIGKILL) mid-round and restarted with the same config.

Real processes: one aggregator and three nodes over mutual TLS with secure aggregation by
masking.  After the restart the aggregator resumes from the last complete, hash-verified
checkpoint; the nodes rejoin, the interrupted round is run again with fresh keys, and the
federation completes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedbrats.config import load_config, to_toml, with_overrides
from fedbrats.provision import provision
from node.synth import synthesize

SITES = ["site-1", "site-2", "site-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, log):
    return subprocess.Popen([sys.executable, "-m", "fedbrats.cli", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_for(path, text, timeout, procs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a process died early: {p.args}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


@pytest.mark.slow
def test_k11_aggregator_killed_mid_round_resumes_from_checkpoint(tmp_path):
    data = tmp_path / "data"
    synthesize(data, sites=3, cases_per_site=2, seed=1, spacing_mm=4.0)
    kits = tmp_path / "federation"
    port = _free_port()
    provision(kits, federation="k11", sites=SITES, aggregator=f"127.0.0.1:{port}", localhost=True)
    common = dict(
        federation={"rounds": 3, "sites": 3, "min_sites": 2, "secure_aggregation": "mask"},
        training={"local_steps": 2, "patch_size": [32, 32, 32]},
        evaluation={"roi_size": [48, 56, 48]},
        secagg={"stage_timeout_s": 30.0},
    )
    out = tmp_path / "agg"
    agg_cfg = with_overrides(load_config(kits / "aggregator" / "aggregator.toml"),
                             aggregator={"host": "127.0.0.1", "port": port, "out_dir": str(out),
                                         "round_timeout_s": 120.0, "metrics_timeout_s": 60.0},
                             **common)
    agg_toml = tmp_path / "aggregator.toml"
    agg_toml.write_text(to_toml(agg_cfg))
    logs = tmp_path / "logs"
    logs.mkdir()
    agg = _spawn(["aggregator", "--config", str(agg_toml)], logs / "agg-1.log")
    nodes = []
    try:
        for s in SITES:
            cfg = with_overrides(load_config(kits / s / f"{s}.toml"), data={"root": str(data)},
                                 node={"state_dir": str(tmp_path / s), "connect_timeout_s": 120.0},
                                 **common)
            path = tmp_path / f"{s}.toml"
            path.write_text(to_toml(cfg))
            nodes.append(_spawn(["node", "--config", str(path)], logs / f"{s}.log"))
        # Kill -9 once round 2's masked inputs have started to arrive.
        _wait_for(logs / "agg-1.log", "round 2 stage masked_input: update from site", 300,
                  [agg, *nodes])
        agg.send_signal(signal.SIGKILL)
        agg.wait(timeout=30)
        resume = json.loads((out / "resume.json").read_text())
        assert resume["completed_round"] == 1
        agg = _spawn(["aggregator", "--config", str(agg_toml)], logs / "agg-2.log")
        assert agg.wait(timeout=400) == 0, (logs / "agg-2.log").read_text()[-3000:]
        for n in nodes:
            assert n.wait(timeout=60) == 0
    finally:
        for p in [agg, *nodes]:
            if p.poll() is None:
                p.kill()
    log2 = (logs / "agg-2.log").read_text()
    assert "resuming federation k11 after round 1 from its verified checkpoint" in log2
    assert "round 2 stage unmask" in log2 and "round 3 stage unmask" in log2
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    aggregated = [e["round"] for e in events if e["event"] == "round_aggregated"]
    assert aggregated == [1, 2, 3]  # round 2 counted once, after the restart
    assert events[-1]["event"] == "finished" and not events[-1]["failed"]
    for s in SITES:
        assert "joining again" in (logs / f"{s}.log").read_text()
    assert json.loads((out / "resume.json").read_text())["completed_round"] == 3
