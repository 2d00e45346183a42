"""The committed stubs under fedbrats/v1/ are exactly what scripts/gen_protos.py generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_committed(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.name for p in (tmp_path / "fedbrats" / "v1").glob("*_pb2*"))
    committed = sorted(p.name for p in (ROOT / "fedbrats" / "v1").glob("*_pb2*"))
    assert generated == committed and generated, (generated, committed)
    for name in generated:
        new = (tmp_path / "fedbrats" / "v1" / name).read_bytes()
        old = (ROOT / "fedbrats" / "v1" / name).read_bytes()
        assert new == old, f"fedbrats/v1/{name} differs from protoc output: run `make protos`"


def test_only_the_wire_codec_imports_pb2():
    offenders = []
    for pkg in ("fedbrats", "node", "aggregator", "crypto", "experiments"):
        for p in (ROOT / pkg).rglob("*.py"):
            if "v1" in p.parts or p.name == "wire.py":
                continue
            text = p.read_text()
            if "_pb2" in text.replace("health_pb2", ""):
                offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []
