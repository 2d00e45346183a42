#!/usr/bin/env python3
"""Cost of fedbrats' CKKS aggregation (``crypto.ckks``) next to raw TenSEAL and plaintext numpy.

For P = 1M and 5M float parameters (``--sizes``), with fedbrats' default parameters
(``crypto.ckks.DEFAULT_PARAMS``: N = 8192, primes [60, 40], scale 2^40, symmetric encryption):

* **encrypt** (one site): ``crypto.ckks.encrypt_update(w * delta, w, ctx, workers=1)`` -- finite
  and range checks, weight appended, one ``ckks_vector`` per 4096 values, serialisation, framing
  -- against the same chunks encrypted by raw TenSEAL calls on the same data and the same
  parameters (``ts.ckks_vector(ctx, chunk).serialize()`` in a loop).  Also with worker processes
  (``workers=--workers``; CPU time then includes the workers').
* **add** (aggregator, per site): ``EncryptedSum.add`` (unframe, deserialise, check ring/level/
  scale/size, add in place) against raw ``ts.ckks_vector_from`` + ``add_``, and a plaintext
  ``numpy`` float64 ``+=`` of the same vector.
* **serialize** (aggregator, once per round): ``EncryptedSum.serialize`` against raw
  ``serialize``.
* **decrypt** (one site): ``decrypt_aggregate(workers=1)`` against raw ``ckks_vector_from`` +
  ``decrypt``.
* **bytes per parameter** on the wire, and ``payload_size``'s prediction.
* **parameter sets**: bytes/parameter of the alternatives (longer chains, public-key encryption,
  smaller first primes, and SEAL's seeded symmetric ciphertexts through ``tenseal.sealapi``).
* ``--precision``: 10 sites x 4.70M parameters (case K06 c), FedAvg error against plaintext.

The machine may be shared, so every timing is the median of ``--repeats`` runs in **process CPU
time** (user + system, of this process and of finished worker processes), which is what an idle
core would take; wall-clock medians are printed beside it and written to ``--out``.  fedbrats and
raw TenSEAL alternate within each repeat.

Usage (from the repository root)::

    PYTHONPATH=. /tmp/venv0/bin/python benchmarks/ckks_bench.py --precision --out /tmp/ckks.json
    PYTHONPATH=. /tmp/venv0/bin/python benchmarks/ckks_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from crypto import ckks

SLOTS = ckks.DEFAULT_PARAMS.slots


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, cpu_seconds() - c0, time.perf_counter() - t0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tenseal": ts.__version__,
        "git": commit,
        "loadavg_start": os.getloadavg(),
    }


def raw_context(params: ckks.CKKSParams, symmetric: bool = True) -> Any:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC,
        n_threads=1,
    )
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def size_case(p: int, repeats: int, workers: int, sec: ckks.CKKSContext, pub: ckks.CKKSContext) -> dict[str, Any]:
    rng = np.random.default_rng(p)
    weight = 37.0
    x = weight * rng.normal(0.0, 0.01, p)  # w * delta, float64
    data = np.append(x, weight)  # what raw TenSEAL gets: the same values, weight included
    raw_sec = raw_context(sec.params)
    raw_pub = ts.context_from(
        raw_sec.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False),
        n_threads=1,
    )
    acc_plain = np.zeros(p)
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, cpu: float, wall: float) -> None:
        rows.setdefault(name, {"cpu": [], "wall": []})
        rows[name]["cpu"].append(cpu)
        rows[name]["wall"].append(wall)

    chunks = raw_chunks = None
    for r in range(repeats):
        log(f"  P={p:,} repeat {r + 1}/{repeats}")
        chunks, c, w = timed(lambda: ckks.encrypt_update(x, weight, sec, workers=1))
        record("encrypt fedbrats", c, w)
        raw_chunks, c, w = timed(
            lambda: [ts.ckks_vector(raw_sec, data[i : i + SLOTS]).serialize() for i in range(0, data.size, SLOTS)]
        )
        record("encrypt raw TenSEAL", c, w)
        if workers > 1:
            _, c, w = timed(lambda: ckks.encrypt_update(x, weight, sec, workers=workers))
            record(f"encrypt fedbrats, {workers} workers", c, w)

        total = ckks.EncryptedSum(pub, num_params=p)
        total.add(chunks)  # the first site: the sum takes its vectors
        _, c, w = timed(lambda: total.add(chunks))
        record("add fedbrats", c, w)
        raw_acc = [ts.ckks_vector_from(raw_pub, b) for b in raw_chunks]

        def raw_add() -> None:
            for acc, b in zip(raw_acc, raw_chunks):
                acc.add_(ts.ckks_vector_from(raw_pub, b))

        _, c, w = timed(raw_add)
        record("add raw TenSEAL", c, w)

        def plain_add() -> None:
            acc_plain.__iadd__(x)

        _, c, w = timed(plain_add)
        record("add plaintext numpy", c, w)

        agg, c, w = timed(total.serialize)
        record("serialize sum fedbrats", c, w)
        raw_agg, c, w = timed(lambda: [v.serialize() for v in raw_acc])
        record("serialize sum raw TenSEAL", c, w)

        (s, w_tot), c, w = timed(lambda: ckks.decrypt_aggregate(agg, sec, p, workers=1))
        record("decrypt fedbrats", c, w)
        out, c, w = timed(
            lambda: np.concatenate([np.asarray(ts.ckks_vector_from(raw_sec, b).decrypt()) for b in raw_agg])
        )
        record("decrypt raw TenSEAL", c, w)
        err = float(max(np.abs(s - 2 * x).max(), abs(w_tot - 2 * weight)))
        raw_err = float(np.abs(out - 2 * data).max())

    med = {k: {"cpu_s": statistics.median(v["cpu"]), "wall_s": statistics.median(v["wall"])} for k, v in rows.items()}
    for v in med.values():
        v["mparam_per_cpu_s"] = p / v["cpu_s"] / 1e6 if v["cpu_s"] > 0 else float("inf")
    wire = sum(len(b) for b in chunks)
    return {
        "params": p,
        "chunks": len(chunks),
        "bytes": wire,
        "bytes_per_param": wire / p,
        "raw_bytes_per_param": sum(len(b) for b in raw_chunks) / p,
        "payload_size": ckks.payload_size(p, sec.params),
        "max_abs_error_2_sites": err,
        "raw_max_abs_error_2_sites": raw_err,
        "timings": med,
    }


def seeded_bytes_per_param(params: ckks.CKKSParams) -> float:
    """SEAL's seeded symmetric ciphertext (c1 replaced by its PRNG seed), through tenseal.sealapi."""
    from tenseal import sealapi as s

    n = params.poly_modulus_degree
    parms = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(s.CoeffModulus.Create(n, list(params.coeff_mod_bit_sizes)))
    ctx = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    keygen = s.KeyGenerator(ctx)
    encryptor = s.Encryptor(ctx, keygen.secret_key())
    plain = s.Plaintext()
    s.CKKSEncoder(ctx).encode(list(np.random.default_rng(0).uniform(-1, 1, n // 2)), 2.0**params.scale_bits, plain)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "seeded")
        encryptor.encrypt_symmetric(plain).save(path)  # the sealapi binding saves to a path only
        return os.path.getsize(path) / (n // 2)


def parameter_sets() -> list[dict[str, Any]]:
    cases = [
        ("fedbrats default: [60, 40], 2^40, symmetric", ckks.DEFAULT_PARAMS, True),
        ("[60, 40], 2^40, public-key encryption", ckks.DEFAULT_PARAMS, False),
        ("[60, 40, 60], 2^40 (NVIDIA FLARE's chain)", ckks.CKKSParams(8192, (60, 40, 60), 40), True),
        ("[60, 40, 40, 60], 2^40 (TenSEAL tutorials)", ckks.CKKSParams(8192, (60, 40, 40, 60), 40), True),
        ("[52, 40], 2^34", ckks.CKKSParams(8192, (52, 40), 34), True),
        ("[48, 40], 2^32", ckks.CKKSParams(8192, (48, 40), 32), True),
        ("[40, 40], 2^25", ckks.CKKSParams(8192, (40, 40), 25), True),
        ("[60, 49], 2^40, N = 4096", ckks.CKKSParams(4096, (60, 49), 40), True),
    ]
    out = []
    for label, params, symmetric in cases:
        ctx = raw_context(params, symmetric)
        rng = np.random.default_rng(1)
        vals = rng.uniform(-1, 1, (8, params.slots))
        blobs = [ts.ckks_vector(ctx, v).serialize() for v in vals]
        errs = [np.abs(np.asarray(ts.ckks_vector_from(ctx, b).decrypt()) - v).max() for b, v in zip(blobs, vals)]
        row = {
            "label": label,
            "bytes_per_param": (sum(map(len, blobs)) + 8 * ckks.CHUNK_HEADER_BYTES) / vals.size,
            "max_abs_error_1_site": float(max(errs)),
        }
        try:
            ckks.check_params(params, max_sites=10, max_abs_value=0.1, max_weight=100)
            row["check_params(10 sites, 0.1, 100)"] = "accepted"
        except Exception as exc:  # ConfigError: report the first problem
            row["check_params(10 sites, 0.1, 100)"] = "refused: " + exc.problems[0].split(":")[0]
        out.append(row)
    out.append(
        {
            "label": "[60, 40], 2^40, seeded symmetric (sealapi; plan)",
            "bytes_per_param": seeded_bytes_per_param(ckks.DEFAULT_PARAMS),
        }
    )
    return out


def precision_case(p: int, sites: int, sec: ckks.CKKSContext, pub: ckks.CKKSContext) -> dict[str, Any]:
    rng = np.random.default_rng(106)
    weights = rng.integers(1, 101, sites).astype(np.float64)
    total = ckks.EncryptedSum(pub, num_params=p, max_sites=sites)
    exact = np.zeros(p)
    t0 = time.perf_counter()
    for i, w in enumerate(weights):
        delta = rng.uniform(-0.1, 0.1, p).astype(np.float32).astype(np.float64)
        total.add(ckks.encrypt_update(w * delta, w, sec, max_abs_value=0.1))
        exact += w * delta
        log(f"  precision: site {i + 1}/{sites}")
    s, w_tot = ckks.decrypt_aggregate(total.serialize(), sec, p)
    err = float(np.abs(s / w_tot - exact / weights.sum()).max())
    return {
        "params": p,
        "sites": sites,
        "max_abs_fedavg_error": err,
        "max_abs_sum_error": float(np.abs(s - exact).max()),
        "bound_sum_error": ckks.decryption_error_bound(sec.params, sites),
        "wall_s": time.perf_counter() - t0,
    }


def fmt_table(cases: list[dict[str, Any]]) -> str:
    ops = [
        ("encrypt fedbrats", "encrypt raw TenSEAL"),
        ("add fedbrats", "add raw TenSEAL"),
        ("serialize sum fedbrats", "serialize sum raw TenSEAL"),
        ("decrypt fedbrats", "decrypt raw TenSEAL"),
    ]
    lines = [
        "| P | operation | fedbrats CPU s | raw TenSEAL CPU s | fedbrats / raw throughput "
        "| fedbrats Mparam/CPU-s | fedbrats wall s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        t = case["timings"]
        for mine, raw in ops:
            a, b = t[mine], t[raw]
            lines.append(
                f"| {case['params']:,} | {mine.split(' fedbrats')[0]} | {a['cpu_s']:.3f} | {b['cpu_s']:.3f} | "
                f"{b['cpu_s'] / a['cpu_s']:.0%} | {a['mparam_per_cpu_s']:.2f} | {a['wall_s']:.3f} |"
            )
        plain = t["add plaintext numpy"]
        lines.append(
            f"| {case['params']:,} | add, plaintext numpy | {plain['cpu_s']:.4f} | | | "
            f"{plain['mparam_per_cpu_s']:.0f} | {plain['wall_s']:.4f} |"
        )
        for k, v in t.items():
            if "workers" in k:
                lines.append(
                    f"| {case['params']:,} | {k.replace(' fedbrats', '')} (CPU incl. workers) | {v['cpu_s']:.3f} | | | "
                    f"{v['mparam_per_cpu_s']:.2f} | {v['wall_s']:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--precision", action="store_true", help="also run 10 sites x 4.70M parameters (K06 c)")
    ap.add_argument("--quick", action="store_true", help="P = 200k, 1 repeat, no parameter-set table")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats = [200_000], 1

    info = machine()
    log(f"machine: {info}")
    fed = ckks.make_context(ckks.DEFAULT_PARAMS)
    sec = ckks.load_context(fed.secret, expect_secret=True)
    pub = ckks.load_context(fed.public, expect_secret=False)
    result: dict[str, Any] = {"machine": info, "params": repr(ckks.DEFAULT_PARAMS), "sizes": []}
    for p in args.sizes:
        log(f"size {p:,}")
        result["sizes"].append(size_case(p, args.repeats, args.workers, sec, pub))
    if not args.quick:
        log("parameter sets")
        result["parameter_sets"] = parameter_sets()
    if args.precision:
        result["precision"] = precision_case(4_700_000, 10, sec, pub)
    result["machine"]["loadavg_end"] = os.getloadavg()

    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}, "
          f"TenSEAL {info['tenseal']}, numpy {info['numpy']}; load average {info['loadavg_start']} -> "
          f"{result['machine']['loadavg_end']}\n")
    print(fmt_table(result["sizes"]))
    print()
    for case in result["sizes"]:
        print(
            f"P={case['params']:,}: {case['chunks']} ciphertexts, {case['bytes']:,} bytes = "
            f"{case['bytes_per_param']:.2f} B/param (raw TenSEAL {case['raw_bytes_per_param']:.2f}; "
            f"payload_size predicted {case['payload_size']:,}); max error of a 2-site sum "
            f"{case['max_abs_error_2_sites']:.2g} (raw {case['raw_max_abs_error_2_sites']:.2g})"
        )
    if "parameter_sets" in result:
        print("\n| parameter set | bytes/param | max error, 1 site "
              "| check_params (10 sites, |Δ| ≤ 0.1, w ≤ 100) |")
        print("|---|---:|---:|---|")
        for row in result["parameter_sets"]:
            e = row.get("max_abs_error_1_site")
            print(
                f"| {row['label']} | {row['bytes_per_param']:.2f} | {'' if e is None else f'{e:.1e}'} | "
                f"{row.get('check_params(10 sites, 0.1, 100)', '')} |"
            )
    if "precision" in result:
        pr = result["precision"]
        print(
            f"\nprecision: {pr['sites']} sites x {pr['params']:,} parameters: max |FedAvg error| "
            f"{pr['max_abs_fedavg_error']:.2e}, max |sum error| {pr['max_abs_sum_error']:.2e} "
            f"(bound {pr['bound_sum_error']:.2e}), {pr['wall_s']:.0f} s wall"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
