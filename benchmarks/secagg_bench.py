#!/usr/bin/env python3
"""Cost of fedbrats' secure aggregation (pairwise masking) next to Flower's SecAgg+ and training.

What is timed, for n sites and P float32 parameters (updates uniform in +-0.05):

fedbrats (this repository, run with the fedbrats interpreter, ``PYTHONPATH`` = repo root):
    * per-site masking, complete graph -- what ``node.secagg_client.MaskingClient.mask`` does:
      flatten into P+1 float32 slots, ``crypto.quantize.quantize`` (stochastic rounding, times
      the weight; it also refuses non-finite values), the weight into the last slot,
      ``crypto.primitives.x25519_shared`` with each of the n-1 neighbours and
      ``crypto.secagg.mask_update`` (self mask + n-1 pairwise masks; HKDF + ChaCha20 PRG), with
      ``--threads`` crypto threads (default ``crypto.primitives.worker_threads()``) and, for
      reference, with one;
    * the same with a SecAgg+ graph of degree k = 2*ceil(log2 n) (``crypto.secagg.neighbours``);
    * aggregator: modular sum of the n masked vectors, ``crypto.secagg.unmask_sum`` with every
      self seed (no drop), weight check, ``crypto.quantize.dequantize_sum``; and the same with one
      site dropped (its pairwise secrets with the survivors recomputed by X25519, as
      ``crypto.secagg.recover_dropped_pairwise`` does after the Shamir recovery, which is not
      timed here, nor on Flower's side);
    * baseline: plain numpy sum of the same n float32 vectors.

Flower (``flwr``, in a *separate* interpreter, ``--flwr-python``): the same per-site and server
work built from the public helpers of ``flwr.common.secure_aggregation`` (``quantization.quantize``,
``secaggplus_utils.pseudo_rand_gen``, ``ndarrays_arithmetic.*``,
``crypto.symmetric_encryption.generate_shared_key``) and Flower's EC key (de)serialisation,
in the order Flower's ``secaggplus_mod`` / ``SecAggPlusWorkflow`` call them.  This file runs
itself under that interpreter with ``--flwr-worker``; it imports nothing from fedbrats there.

Reference: one local training step of the demo model (SegResNet, 8 initial filters, batch 2,
48^3 patches, 4 channels, Dice loss + Adam) with ``torch.set_num_threads`` = each of
``--train-threads`` (default 1 -- what the demo uses per node -- and 2).

Every timing is the median of ``--repeats`` runs, in process CPU time (user + system, all
threads) and in wall time; the load average is recorded per case.  Peak memory is the growth of the resident
set (``VmHWM`` after resetting it via ``/proc/self/clear_refs``) over the resident size before
the operation; it is left out where ``/proc`` does not allow it.

Usage (from the repository root)::

    PYTHONPATH=. /tmp/venv0/bin/python benchmarks/secagg_bench.py --out benchmarks/results.json
    PYTHONPATH=. /tmp/venv0/bin/python benchmarks/secagg_bench.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Only the standard library and numpy at module level: this file also runs under Flower's
# interpreter (``--flwr-worker``), where fedbrats is not importable.

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLWR_PYTHON = "/tmp/flwr-venv/bin/python"
CLIP = 0.25
BITS = 20
MODULUS_BITS = 32
MAX_WEIGHT = 100
FEDERATION = "bench"
ROUND = 1
UPDATE_RANGE = 0.05
#: Which clock the reported medians use: "cpu" (process CPU time, user + system -- robust when
#: other jobs share the cores) or "wall".  Both are always recorded in the JSON.
CLOCK = "cpu"


# ---------------------------------------------------------------------------------------------
# Shared helpers (stdlib + numpy only)


def _libc_trim() -> None:
    """Give freed heap memory back to the OS so resident-set baselines are honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def bench(fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs, and the peak extra RSS (MiB)."""
    _libc_trim()
    rss0 = _status_kib("VmRSS")
    can_peak = rss0 is not None and _reset_peak()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del out
    peak = None
    if can_peak:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            peak = round(max(0, hwm - rss0) / 1024, 1)
    return {"median_s": statistics.median(cpu if CLOCK == "cpu" else times), "wall_median_s": statistics.median(times),
            "cpu_median_s": statistics.median(cpu), "wall_s": times, "cpu_s": cpu, "peak_extra_mib": peak}


def make_update(p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-UPDATE_RANGE, UPDATE_RANGE, p).astype(np.float32)


def site_weights(n: int) -> list[int]:
    return [1 + (37 * i + 11) % MAX_WEIGHT for i in range(n)]


def secaggplus_degree(n: int) -> int:
    """k = 2 * ceil(log2 n): even, of order log n (Bell et al. 2020)."""
    return 2 * math.ceil(math.log2(n))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# fedbrats


def fedbrats_case(n: int, p: int, repeats: int, threads: int | None = None) -> dict[str, Any]:
    from crypto import primitives, secagg
    from crypto import quantize as quant
    from node.secagg_client import flatten_with_weight_slot

    threads = primitives.worker_threads(threads)

    params = quant.check_budget(
        quant.QuantParams(clip=CLIP, bits=BITS, modulus_bits=MODULUS_BITS, max_sites=n, max_weight=MAX_WEIGHT),
        widen=True,
    )
    bits = params.modulus_bits
    sites = [f"site-{i:02d}" for i in range(n)]
    weights = dict(zip(sites, site_weights(n)))
    keys = {s: primitives.x25519_keypair() for s in sites}  # (private, public) mask keys
    seeds = {s: secagg.new_seed() for s in sites}
    updates = {s: make_update(p, seed=1000 * n + i) for i, s in enumerate(sites)}
    complete = {s: frozenset(t for t in sites if t != s) for s in sites}
    k = secaggplus_degree(n)
    graph_seed = hashlib.sha256(b"bench/graph-seed\x00" + n.to_bytes(4, "big")).digest()
    sparse = secagg.neighbours(sites, k=k, seed=graph_seed)
    me = sites[0]

    # -- one site, as MaskingClient.mask does it ----------------------------------------------
    def quantise(site: str, th: int = threads) -> np.ndarray:
        # MaskingClient.mask: flatten into P + 1 float32 slots, quantise, weight in the last slot.
        flat, dim = flatten_with_weight_slot({"update": updates[site]})
        vec, _clipped = quant.quantize(flat, params, seed=os.urandom(16), weight=weights[site], threads=th)
        vec[dim] = weights[site]
        return vec

    def agree(site: str, nbrs: frozenset[str]) -> dict[str, bytes]:
        return {v: primitives.x25519_shared(keys[site][0], keys[v][1]) for v in nbrs}

    def mask(site: str, nbrs: frozenset[str], th: int = threads) -> np.ndarray:
        vec = quantise(site, th)
        pairwise = agree(site, nbrs)
        return secagg.mask_update(vec, self_seed=seeds[site], pairwise_keys=pairwise, own_id=site,
                                  round=ROUND, federation=FEDERATION, bits=bits, threads=th)

    res: dict[str, Any] = {"n": n, "P": p, "modulus_bits": bits, "k": k, "threads": threads, "loadavg": _loadavg(),
                           "k_effective": len(sparse[me]), "pairwise_complete": n - 1}
    res["site_mask"] = bench(lambda: mask(me, complete[me]), repeats)
    res["site_mask_1thread"] = bench(lambda: mask(me, complete[me], 1), repeats)
    res["site_mask_secaggplus"] = bench(lambda: mask(me, sparse[me]), repeats)

    # Profile of the complete-graph site work: quantisation / key agreement / PRG masks.
    vec0 = quantise(me)
    secrets0 = agree(me, complete[me])
    res["profile"] = {
        "quantise": bench(lambda: quantise(me), repeats),
        "x25519": bench(lambda: agree(me, complete[me]), repeats),
        "hkdf": bench(lambda: [primitives.derive_key(s, purpose=secagg.PAIRWISE_PURPOSE, federation=FEDERATION,
                                                     round=ROUND, i=me, j=v) for v, s in secrets0.items()],
                      repeats),
        "mask_update": bench(lambda: secagg.mask_update(vec0, self_seed=seeds[me], pairwise_keys=secrets0,
                                                        own_id=me, round=ROUND, federation=FEDERATION, bits=bits,
                                                        threads=threads),
                             repeats),
        "prg_one_mask": bench(lambda: primitives.prg_uint(seeds[me], p + 1, bits=bits, threads=threads), repeats),
    }
    del vec0

    # -- every site masks once (complete graph): the aggregator's input -------------------------
    masked = {s: mask(s, complete[s]) for s in sites}

    def modular_sum(names: list[str]) -> np.ndarray:
        total = np.zeros(p + 1, dtype=params.dtype)
        for s in names:
            total += masked[s]  # wraps modulo 2^bits, as MaskedRound.add_masked
        return total

    def finish(total: np.ndarray, survivors: list[str], dropped_pairs: dict) -> np.ndarray:
        out = secagg.unmask_sum(total, survivors_self_seeds={s: seeds[s] for s in survivors},
                                dropped_pairwise=dropped_pairs, round=ROUND, federation=FEDERATION, bits=bits,
                                threads=threads)
        w = int(out[-1])
        if not 1 <= w <= len(survivors) * MAX_WEIGHT:
            raise AssertionError(f"unmasked weight {w} impossible: masks did not cancel")
        return quant.dequantize_sum(out[:-1], params=params, total_weight=w)

    dropped = sites[-1]
    survivors = sites[:-1]

    def drop_pairs() -> dict[tuple[str, str], bytes]:
        # What recover_dropped_pairwise computes once the dropped key is rebuilt from shares.
        return {(u, dropped): primitives.x25519_shared(keys[dropped][0], keys[u][1])
                for u in survivors if u in complete[dropped]}

    res["agg_sum"] = bench(lambda: modular_sum(sites), repeats)
    total_all = modular_sum(sites)
    res["agg_unmask"] = bench(lambda: finish(total_all, sites, {}), repeats)
    res["agg_sum_drop1"] = bench(lambda: modular_sum(survivors), repeats)
    total_surv = modular_sum(survivors)
    res["agg_unmask_drop1"] = bench(lambda: finish(total_surv, survivors, drop_pairs()), repeats)

    # Correctness of what was timed: the decoded means are within one step of the true ones.
    def check(names: list[str], mean: np.ndarray) -> float:
        w = np.array([weights[s] for s in names], dtype=np.float64)
        ref = np.zeros(p, dtype=np.float64)
        for s, ws in zip(names, w):
            ref += ws * updates[s]
        ref /= w.sum()
        err = float(np.max(np.abs(mean - ref)))
        if err > params.step * 1.0001:
            raise AssertionError(f"decoded mean off by {err} > step {params.step}")
        return err

    res["max_abs_error"] = check(sites, finish(total_all, sites, {}))
    res["max_abs_error_drop1"] = check(survivors, finish(total_surv, survivors, drop_pairs()))
    res["step"] = params.step
    del masked, total_all, total_surv

    # -- baseline: plain float32 sum ------------------------------------------------------------
    def plain_sum() -> np.ndarray:
        acc = np.zeros(p, dtype=np.float32)
        for s in sites:
            acc += updates[s]
        return acc

    res["plain_sum"] = bench(plain_sum, repeats)
    return res


# ---------------------------------------------------------------------------------------------
# Flower (runs under --flwr-python; must not import fedbrats)


def _flower_api() -> dict[str, Any]:
    from flwr.common.secure_aggregation import ndarrays_arithmetic as na
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    try:  # flwr >= 1.2x keeps the EC key helpers here
        from flwr.supercore.primitives import asymmetric as ak
    except ImportError:  # older releases kept them next to generate_shared_key
        from flwr.common.secure_aggregation.crypto import symmetric_encryption as ak
    return {
        "na": na, "generate_shared_key": generate_shared_key, "quantize": quantize, "dequantize": dequantize,
        "pseudo_rand_gen": pseudo_rand_gen, "generate_key_pairs": ak.generate_key_pairs,
        "private_key_to_bytes": ak.private_key_to_bytes, "public_key_to_bytes": ak.public_key_to_bytes,
        "bytes_to_private_key": ak.bytes_to_private_key, "bytes_to_public_key": ak.bytes_to_public_key,
    }


def flower_case(api: dict[str, Any], n: int, p: int, repeats: int) -> dict[str, Any]:
    """Flower SecAgg+ site and server arithmetic on the same sizes (complete graph).

    Parameters chosen to match fedbrats': clipping range 0.25, quantisation range 2^20 - 1
    levels, modulus 2^32, max_weight 100.  The site work follows the order of Flower's
    ``secaggplus_mod`` stage "collect masked vectors"; the server work that of
    ``SecAggPlusWorkflow`` (sum of masked vectors, then the unmask stage).
    """
    na = api["na"]
    prg = api["pseudo_rand_gen"]
    clip, target_range, mod_range, max_weight = CLIP, (1 << BITS) - 1, 1 << MODULUS_BITS, float(MAX_WEIGHT)
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global state
    nids = list(range(1, n + 1))
    weights = dict(zip(nids, site_weights(n)))
    updates = {nid: make_update(p, seed=1000 * n + i) for i, nid in enumerate(nids)}
    sk1, pk1 = {}, {}
    for nid in nids:
        sk, pk = api["generate_key_pairs"]()
        sk1[nid], pk1[nid] = api["private_key_to_bytes"](sk), api["public_key_to_bytes"](pk)
    rd_seed = {nid: os.urandom(32) for nid in nids}

    def shared_key(a: int, b: int) -> bytes:
        return api["generate_shared_key"](api["bytes_to_private_key"](sk1[a]), api["bytes_to_public_key"](pk1[b]))

    def site(nid: int) -> list[np.ndarray]:
        q_ratio = round(weights[nid] / max_weight * target_range)
        dq_ratio = q_ratio / target_range
        params = na.parameters_multiply([updates[nid]], dq_ratio)
        qp = api["quantize"](params, clip, target_range)
        qp = na.factor_combine(q_ratio, qp)
        dims = [a.shape for a in qp]
        qp = na.parameters_addition(qp, prg(rd_seed[nid], mod_range, dims))
        for other in nids:
            if other == nid:
                continue
            mask = prg(shared_key(nid, other), mod_range, dims)
            qp = na.parameters_addition(qp, mask) if nid > other else na.parameters_subtraction(qp, mask)
        return na.parameters_mod(qp, mod_range)

    res: dict[str, Any] = {"n": n, "P": p}
    me = nids[0]
    res["site_mask"] = bench(lambda: site(me), repeats)
    res["profile"] = {
        "quantise": bench(lambda: na.factor_combine(
            1, api["quantize"](na.parameters_multiply([updates[me]], 0.5), clip, target_range)), repeats),
        "key_agreement": bench(lambda: [shared_key(me, o) for o in nids if o != me], repeats),
        "prg_one_mask": bench(lambda: prg(rd_seed[me], mod_range, [(1,), (p,)]), repeats),
    }
    masked = {nid: site(nid) for nid in nids}

    def server_sum(active: list[int]) -> list[np.ndarray]:
        vec = None
        for nid in active:
            vec = masked[nid] if vec is None else na.parameters_addition(vec, masked[nid])
        return na.parameters_mod(vec, mod_range)

    def unmask(vec: list[np.ndarray], active: list[int], dead: list[int]) -> list[np.ndarray]:
        shapes = na.get_parameters_shape(vec)
        for nid in active:
            vec = na.parameters_subtraction(vec, prg(rd_seed[nid], mod_range, shapes))
        for nid in dead:  # the server rebuilt sk1 of the dropped node from shares
            for nb in nids:
                if nb == nid:
                    continue
                mask = prg(shared_key(nid, nb), mod_range, shapes)
                vec = na.parameters_addition(vec, mask) if nid > nb else na.parameters_subtraction(vec, mask)
        recon = na.parameters_mod(vec, mod_range)
        q_total_ratio, recon = na.factor_extract(recon)
        inv = target_range / q_total_ratio
        out = api["dequantize"](recon, clip, target_range)
        offset = -(len(active) - 1) * clip
        for v in out:
            v += offset
            v *= inv
        return out

    active_all, active_drop, dead = nids, nids[:-1], [nids[-1]]
    res["agg_sum"] = bench(lambda: server_sum(active_all), repeats)
    total_all = server_sum(active_all)
    res["agg_unmask"] = bench(lambda: unmask(total_all, active_all, []), repeats)
    res["agg_sum_drop1"] = bench(lambda: server_sum(active_drop), repeats)
    total_drop = server_sum(active_drop)
    res["agg_unmask_drop1"] = bench(lambda: unmask(total_drop, active_drop, dead), repeats)

    def check(active: list[int], mean: np.ndarray) -> float:
        w = np.array([round(weights[a] / max_weight * target_range) for a in active], dtype=np.float64)
        ref = sum(wi * updates[a].astype(np.float64) for wi, a in zip(w, active)) / w.sum()
        return float(np.max(np.abs(mean - ref)))

    res["max_abs_error"] = check(active_all, unmask(total_all, active_all, [])[0])
    res["max_abs_error_drop1"] = check(active_drop, unmask(total_drop, active_drop, dead)[0])
    return res


def flower_worker(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import flwr

        info["flwr"] = getattr(flwr, "__version__", None)
        if info["flwr"] is None:
            from importlib.metadata import version

            info["flwr"] = version("flwr")
        import cryptography

        info["cryptography"] = cryptography.__version__
        api = _flower_api()
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which skips Flower
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "info": info}))
        return 0
    cases = []
    for p in args.params:
        for n in args.sites:
            log(f"[flower] n={n} P={p}")
            cases.append(flower_case(api, n, p, args.repeats))
    print(json.dumps({"info": info, "cases": cases}))
    return 0


def run_flower(args: argparse.Namespace) -> dict[str, Any]:
    exe = args.flwr_python
    if args.no_flwr:
        return {"skipped": "--no-flwr given"}
    if not exe or not Path(exe).exists():
        return {"skipped": f"Flower interpreter {exe!r} not found (create it with `python3 -m venv "
                           f"/tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr numpy`, or pass --flwr-python)"}
    cmd = [exe, str(Path(__file__).resolve()), "--flwr-worker", "--repeats", str(args.repeats), "--clock", args.clock,
           "--sites", ",".join(map(str, args.sites)), "--params", ",".join(map(str, args.params))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # keep fedbrats out of Flower's process
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, text=True, timeout=args.flwr_timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"Flower worker exceeded {args.flwr_timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"skipped": f"Flower worker failed (exit {proc.returncode})"}
    out = json.loads(lines[-1])
    if "error" in out:
        return {"skipped": f"flwr not importable with {exe}: {out['error']}", "info": out.get("info")}
    return out


# ---------------------------------------------------------------------------------------------
# Training step reference


def train_step(steps: int, warmup: int, threads: int = 1) -> dict[str, Any]:
    import torch

    from fedbrats.config import Config
    from node.model import build_model

    try:
        from node.train import make_loss
    except ImportError:  # pragma: no cover -- the same loss, should node.train move it
        from monai.losses import DiceLoss

        def make_loss() -> torch.nn.Module:
            return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, batch=True)

    cfg = Config()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    n_params = sum(int(t.numel()) for t in model.parameters())
    loss_fn = make_loss()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.training.learning_rate)
    gen = torch.Generator().manual_seed(0)
    batch, side = cfg.training.batch_size, tuple(cfg.training.patch_size)
    image = torch.randn((batch, 4, *side), generator=gen)
    target = (torch.rand((batch, 3, *side), generator=gen) < 0.1).float()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    r = bench(step, steps)
    r.update({"loadavg": _loadavg(), "params": n_params, "batch": batch, "patch": list(side), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "warmup": warmup, "steps": steps})
    return r


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import cryptography

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "cryptography": cryptography.__version__}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_busy(interval: float = 3.0) -> float | None:
    """Percentage of all CPUs busy (any process) over ``interval`` seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t1, i1 = sample()
        time.sleep(interval)
        t2, i2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * ((t2 - t1) - (i2 - i1)) / max(1, t2 - t1), 1)


def _wait_idle(max_busy: float, timeout: float) -> float | None:
    """Block until the CPUs are below ``max_busy`` % busy (other jobs paused); the busy figure
    seen, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = _cpu_busy()
        if busy is None:
            return None
        if busy < max_busy:
            return busy
    return None


def idle_headline(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The 10 sites x 5M case and the training steps again, each run started on an idle machine.

    On a shared machine the wall-clock figures of the main run are inflated by other jobs; this
    waits (up to ``--idle-timeout`` s per run) until the CPUs are nearly idle and records the
    busy percentage just before and just after each run.  A run after which the CPUs are busy
    again (another job started during it) is kept but marked ``contaminated`` and does not
    count; at most ``2 * --idle-runs`` attempts are made.
    """
    runs: list[dict[str, Any]] = []
    clean = 0
    for attempt in range(2 * args.idle_runs):
        if clean >= args.idle_runs:
            break
        busy = _wait_idle(args.idle_max_busy, args.idle_timeout)
        if busy is None:
            runs.append({"skipped": f"no idle window within {args.idle_timeout} s"})
            break
        log(f"[idle {attempt + 1}] CPUs {busy} % busy")
        run: dict[str, Any] = {"busy_before_pct": busy, "loadavg_start": _loadavg()}
        run["case"] = fedbrats_case(10, 5_000_000, args.repeats, args.threads)
        steps = args.train_steps or 5
        run["train_steps"] = {str(th): train_step(steps, warmup=2, threads=th) for th in args.train_threads}
        run["loadavg_end"] = _loadavg()
        run["busy_after_pct"] = _cpu_busy(1.0)
        run["contaminated"] = _contaminated(run, args.idle_max_busy)
        clean += not run["contaminated"]
        runs.append(run)
    return runs


def _contaminated(run: dict[str, Any], max_busy: float) -> bool:
    """Another job was running at the end of an idle run: its CPUs are busy again afterwards
    (more than twice the idle threshold)."""
    after = run.get("busy_after_pct")
    return after is None or after > 2 * max_busy


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}")


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _params(p: int) -> str:
    return f"{p / 1e6:g}M" if p >= 1_000_000 else f"{p / 1e3:g}k"


def markdown(result: dict[str, Any]) -> str:
    fl = {(c["n"], c["P"]): c for c in result["flower"].get("cases", [])}
    lines = [
        f"Medians of {result['settings']['repeats']} runs, {result['clock']} time; fedbrats uses "
        f"{result['settings']['threads']} crypto thread(s) unless a column says 1 thread; load average "
        f"{result.get('loadavg_start')} at start, {result.get('loadavg_end')} at end.",
        "",
        "| n | P | fedbrats mask / site (ms) | fedbrats mask / site, 1 thread (ms) "
        "| fedbrats SecAgg+ k / site (ms) | fedbrats unmask (ms) "
        "| fedbrats unmask, 1 drop (ms) | plain sum (ms) | Flower / site (ms) | Flower unmask (ms) "
        "| Flower unmask, 1 drop (ms) | fedbrats/Flower site | fedbrats/Flower unmask |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["fedbrats"]:
        f = fl.get((c["n"], c["P"]))
        site = c["site_mask"]["median_s"]
        unmask = c["agg_sum"]["median_s"] + c["agg_unmask"]["median_s"]
        unmask_drop = c["agg_sum_drop1"]["median_s"] + c["agg_unmask_drop1"]["median_s"]
        f_site = f["site_mask"]["median_s"] if f else None
        f_unmask = f["agg_sum"]["median_s"] + f["agg_unmask"]["median_s"] if f else None
        f_unmask_drop = f["agg_sum_drop1"]["median_s"] + f["agg_unmask_drop1"]["median_s"] if f else None
        kk = f"{_ms(c['site_mask_secaggplus']['median_s'])} (k={c['k_effective']})"
        lines.append(
            f"| {c['n']} | {_params(c['P'])} | {_ms(site)} | {_ms(c['site_mask_1thread']['median_s'])} "
            f"| {kk} | {_ms(unmask)} | {_ms(unmask_drop)} "
            f"| {_ms(c['plain_sum']['median_s'])} | {_ms(f_site)} | {_ms(f_unmask)} | {_ms(f_unmask_drop)} "
            f"| {_ratio(site, f_site)} | {_ratio(unmask, f_unmask)} |"
        )
    lines += ["", "Per-site profile, complete graph (median ms; PRG = one mask of P+1 words):", "",
              "| n | P | fedbrats quantise | fedbrats X25519 (n−1) | fedbrats HKDF (n−1) | fedbrats mask_update "
              "| fedbrats PRG | Flower quantise | Flower ECDH+HKDF (n−1) | Flower PRG | fedbrats site peak extra RSS (MiB) "
              "| Flower site peak extra RSS (MiB) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["fedbrats"]:
        f = fl.get((c["n"], c["P"]))
        pr = c["profile"]
        fp = f["profile"] if f else {}
        lines.append(
            f"| {c['n']} | {_params(c['P'])} | {_ms(pr['quantise']['median_s'])} | {_ms(pr['x25519']['median_s'])} "
            f"| {_ms(pr['hkdf']['median_s'])} | {_ms(pr['mask_update']['median_s'])} "
            f"| {_ms(pr['prg_one_mask']['median_s'])} "
            f"| {_ms(fp['quantise']['median_s']) if f else '—'} | {_ms(fp['key_agreement']['median_s']) if f else '—'} "
            f"| {_ms(fp['prg_one_mask']['median_s']) if f else '—'} | {c['site_mask']['peak_extra_mib']} "
            f"| {f['site_mask']['peak_extra_mib'] if f else '—'} |"
        )
    lines += ["", "Wall-clock medians (ms; inflated when other jobs share the cores -- see the load average):", "",
              "| n | P | fedbrats mask / site | fedbrats mask / site, 1 thread | fedbrats unmask | plain sum "
              "| Flower / site | Flower unmask |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["fedbrats"]:
        f = fl.get((c["n"], c["P"]))
        lines.append(
            f"| {c['n']} | {_params(c['P'])} | {_ms(c['site_mask']['wall_median_s'])} "
            f"| {_ms(c['site_mask_1thread']['wall_median_s'])} "
            f"| {_ms(c['agg_sum']['wall_median_s'] + c['agg_unmask']['wall_median_s'])} "
            f"| {_ms(c['plain_sum']['wall_median_s'])} | {_ms(f['site_mask']['wall_median_s']) if f else '—'} "
            f"| {_ms(f['agg_sum']['wall_median_s'] + f['agg_unmask']['wall_median_s']) if f else '—'} |"
        )
    if "skipped" in result["flower"]:
        lines += ["", f"Flower skipped: {result['flower']['skipped']}"]
    steps = result.get("train_steps") or {}
    ref = next((c for c in result["fedbrats"] if c["n"] == 10 and c["P"] == 5_000_000), None)
    for th, t in sorted(steps.items(), key=lambda kv: int(kv[0])):
        lines += ["", f"Training step (SegResNet {t['params']:,} parameters, batch {t['batch']}, "
                      f"patch {'x'.join(map(str, t['patch']))}, torch {t['threads']} thread(s)): "
                      f"median CPU {_ms(t['cpu_median_s'])} ms, wall {_ms(t['wall_median_s'])} ms "
                      f"over {t['steps']} steps after {t['warmup']} warm-up"]
        if ref:
            for label, m in ((f"{ref['threads']} crypto thread(s)", ref["site_mask"]),
                             ("1 crypto thread", ref["site_mask_1thread"])):
                rc, rw = m["cpu_median_s"] / t["cpu_median_s"], m["wall_median_s"] / t["wall_median_s"]
                lines.append(f"  10 sites x 5M masking ({label}) / this step: CPU {rc:.1%} "
                             f"({'below' if rc < 0.10 else 'NOT below'} 10 %), wall {rw:.1%} "
                             f"({'below' if rw < 0.10 else 'NOT below'} 10 %)")
    lines += _idle_markdown(result.get("idle_headline") or [], result["settings"].get("idle_max_busy", 8.0))
    return "\n".join(lines)


def _idle_markdown(runs: list[dict[str, Any]], max_busy: float) -> list[str]:
    ran = [r for r in runs if "case" in r]
    if not runs:
        return []
    for r in ran:  # runs written before the flag existed
        r.setdefault("contaminated", _contaminated(r, max_busy))
    done = [r for r in ran if not r["contaminated"]]
    lines = ["", f"10 sites x 5M on an idle machine ({len(done)} clean of {len(ran)} runs; a run is "
                 f"contaminated when the CPUs are > {2 * max_busy:g} % busy right after it; ms, CPU / wall):", "",
             "| run | CPUs busy before / after (%) | load avg | mask, T threads | mask, 1 thread "
             "| step, torch 1 thread | step, torch 2 threads |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(ran, 1):
        c, st = r["case"], r["train_steps"]

        def cw(m: dict[str, Any]) -> str:
            return f"{_ms(m['cpu_median_s'])} / {_ms(m['wall_median_s'])}"

        lines.append(f"| {i}{' (contaminated)' if r['contaminated'] else ''} "
                     f"| {r['busy_before_pct']} / {r['busy_after_pct']} | {r['loadavg_start']} "
                     f"| {cw(c['site_mask'])} (T={c['threads']}) | {cw(c['site_mask_1thread'])} "
                     f"| {cw(st['1']) if '1' in st else '—'} | {cw(st['2']) if '2' in st else '—'} |")
    if not done:
        return lines

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in done)

    t = done[0]["case"]["threads"]
    mask_cpu = med(lambda r: r["case"]["site_mask"]["cpu_median_s"])
    mask_wall = med(lambda r: r["case"]["site_mask"]["wall_median_s"])
    mask1_wall = med(lambda r: r["case"]["site_mask_1thread"]["wall_median_s"])
    lines += ["", "Median over the clean idle runs, per-site masking / one training step:"]
    st = done[0]["train_steps"]
    if "1" in st:
        s1_cpu = med(lambda r: r["train_steps"]["1"]["cpu_median_s"])
        s1_wall = med(lambda r: r["train_steps"]["1"]["wall_median_s"])
        lines += [f"* CPU time, mask ({t} threads) / step (torch 1 thread): {mask_cpu / s1_cpu:.1%}",
                  f"* wall, mask ({t} threads) / step (torch 1 thread, as the demo trains): {mask_wall / s1_wall:.1%}",
                  f"* wall, mask (1 thread) / step (torch 1 thread): {mask1_wall / s1_wall:.1%}"]
    if str(t) in st:
        st_wall = med(lambda r: r["train_steps"][str(t)]["wall_median_s"])
        lines.append(f"* wall, mask ({t} threads) / step (torch {t} threads): {mask_wall / st_wall:.1%}")
    return lines


def _crypto_threads(threads: int | None) -> int:
    from crypto.primitives import worker_threads

    return worker_threads(threads)


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run: n=5,10, P=200k,1M, 3 training steps")
    ap.add_argument("--sites", type=_int_list, default=None, help="comma-separated n (default 5,10,20)")
    ap.add_argument("--params", type=_int_list, default=None, help="comma-separated P (default 1000000,5000000)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per measurement; the median is kept")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 5; quick 3)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step reference")
    ap.add_argument("--train-threads", type=_int_list, default=[1, 2],
                    help="torch thread counts of the training-step reference (default 1,2)")
    ap.add_argument("--idle-runs", type=int, default=0,
                    help="afterwards, run the 10 x 5M case and the training steps this many more times, "
                         "each started once the CPUs are idle (for wall-clock figures on a shared machine)")
    ap.add_argument("--idle-max-busy", type=float, default=8.0, help="CPU %% busy that counts as idle")
    ap.add_argument("--idle-timeout", type=float, default=900.0, help="seconds to wait for each idle window")
    ap.add_argument("--threads", type=int, default=None,
                    help="fedbrats crypto threads (default: crypto.primitives.worker_threads())")
    ap.add_argument("--flwr-python", default=DEFAULT_FLWR_PYTHON, help="interpreter with flwr installed")
    ap.add_argument("--no-flwr", action="store_true", help="skip the Flower comparison")
    ap.add_argument("--flwr-timeout", type=int, default=900, help="seconds allowed for the Flower part")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="clock of the reported medians (both are kept in the JSON; default cpu)")
    ap.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    ap.add_argument("--from-json", type=Path, default=None, help="only print the tables of an earlier --out file")
    ap.add_argument("--flwr-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sites = args.sites or ([5, 10] if args.quick else [5, 10, 20])
    args.params = args.params or ([200_000, 1_000_000] if args.quick else [1_000_000, 5_000_000])
    global CLOCK
    CLOCK = args.clock
    if args.flwr_worker:
        return flower_worker(args)
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text(encoding="utf-8"))))
        return 0

    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    t_start = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "machine": machine_info(),
                              "clock": args.clock,
                              "loadavg_start": _loadavg(),
                              "settings": {"clip": CLIP, "bits": BITS, "modulus_bits": MODULUS_BITS,
                                           "max_weight": MAX_WEIGHT, "update_range": UPDATE_RANGE,
                                           "repeats": args.repeats, "sites": args.sites, "params": args.params,
                                           "threads": _crypto_threads(args.threads),
                                           "idle_runs": args.idle_runs, "idle_max_busy": args.idle_max_busy},
                              "fedbrats": []}
    for p in args.params:
        for n in args.sites:
            log(f"[fedbrats] n={n} P={p}")
            result["fedbrats"].append(fedbrats_case(n, p, args.repeats, args.threads))
            _libc_trim()
    log("[flower] running in a subprocess")
    result["flower"] = run_flower(args)
    if not args.no_train:
        log("[train] reference training step")
        steps = args.train_steps or (3 if args.quick else 5)
        result["train_steps"] = {str(th): train_step(steps, warmup=1 if args.quick else 2, threads=th)
                                 for th in args.train_threads}
    if args.idle_runs:
        result["idle_headline"] = idle_headline(args)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["loadavg_end"] = _loadavg()
    table = markdown(result)
    print(table)
    print(f"\n(total {result['elapsed_s']:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
