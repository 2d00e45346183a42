#!/usr/bin/env python3
"""Regenerate the committed protobuf/gRPC stubs under fedbrats/v1/ from proto/fedbrats/v1/.

Usage: python scripts/gen_protos.py [--out DIR]   (default: the repository root)

The test ``tests/fedbrats/test_protos.py`` regenerates into a temporary directory and fails on
any difference from the committed files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on every proto; return the generated files."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(PROTO_DIR) for p in (PROTO_DIR / "fedbrats" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR / 'fedbrats' / 'v1'}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *[str(p) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    gen = sorted((out / "fedbrats" / "v1").glob("*_pb2*.py*"))
    # protoc writes absolute imports of the generated modules; they are importable as
    # fedbrats.v1.* because the proto package path mirrors the Python package.
    return gen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    (args.out / "fedbrats" / "v1").mkdir(parents=True, exist_ok=True)
    for p in generate(args.out):
        print(p.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
