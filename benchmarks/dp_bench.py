"""One DP-SGD local step vs one non-private step of the demo model.

The demo model (SegResNet, init_filters 8, 1,176,843 parameters), batch 2, 48³ patches with 4
channels, ``torch.set_num_threads(1)``.  Each configuration runs in a fresh subprocess so that its
peak memory is its own: time = median of ``--repeats`` steps after ``--warmup`` steps; memory =
peak resident set size minus the RSS before the first step (CPU; ``ru_maxrss``), or
``torch.cuda.max_memory_allocated`` (GPU, when CUDA is present).

Configurations:

* ``plain``: forward, :func:`node.train.make_loss`, backward, Adam step (the non-private path).
* ``dp-ew``: Opacus ExpandedWeights per-sample gradients on the *stock* model
  (:func:`node.dp.wrap_for_dp`), :func:`node.train.make_dp_loss`, DPOptimizer (clip C = 1,
  σ = 1), Adam — what :class:`node.train.LocalTrainer` uses for SegResNet.
* ``dp-hooks``: Opacus grad-sampler hooks on the DP-safe copy (:func:`node.dp.make_dp_compatible`).
* ``dp-functorch``: functorch (vmap) per-sample gradients for every layer, DP-safe copy.

Reproduce::

    PYTHONPATH=. python benchmarks/dp_bench.py            # CPU (and GPU when available)
    PYTHONPATH=. python benchmarks/dp_bench.py --modes plain,dp-ew --repeats 5

Prints a markdown table (median step time, ratio to ``plain``, peak memory, and the estimate of
:func:`node.dp.estimate_dp_memory`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "dp-ew", "dp-hooks", "dp-functorch")
ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(mode: str, device: str, batch: int, patch: int, warmup: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from fedbrats.config import ModelConfig
    from node.dp import estimate_dp_memory, make_dp_compatible, wrap_for_dp
    from node.model import build_model
    from node.train import make_dp_loss, make_loss, seed_everything

    seed_everything(0)
    dev = torch.device(device)
    model = build_model(ModelConfig(preset="cpu-small")).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, patch, patch, patch, generator=g).to(dev)
    y = (torch.rand(batch, 3, patch, patch, patch, generator=g) > 0.9).float().to(dev)
    estimate = None
    if mode == "plain":
        net, loss_fn = model, make_loss()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    else:
        from opacus.optimizers import DPOptimizer

        gsm = mode.split("-", 1)[1]
        if gsm != "ew":
            make_dp_compatible(model)
        estimate = estimate_dp_memory(model, batch, (patch,) * 3)
        net, loss_fn = wrap_for_dp(model, gsm), make_dp_loss()
        opt = DPOptimizer(torch.optim.Adam(model.parameters(), lr=2e-3), noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    else:
        base_mem = _rss_bytes()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    return {"mode": mode, "device": device, "median_s": statistics.median(times), "times_s": times,
            "peak_bytes": int(peak), "estimate_bytes": estimate}


def _run(mode: str, device: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--device", device, "--batch", str(args.batch),
           "--patch", str(args.patch), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        return {"mode": mode, "device": device, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    lines = ["| device | step | median time (s) | vs plain | peak memory (MiB) | estimate (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    base = {r["device"]: r["median_s"] for r in rows if r["mode"] == "plain" and "median_s" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['mode']} | failed: {r['error'][:60]} | | | |")
            continue
        ratio = r["median_s"] / base[r["device"]] if r["device"] in base else float("nan")
        est = "-" if r.get("estimate_bytes") is None else f"{r['estimate_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['device']} | {r['mode']} | {r['median_s']:.3f} | {ratio:.2f}x | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {est} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="")
    p.add_argument("--child", default="")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.device or "cpu", args.batch, args.patch, args.warmup,
                                args.repeats)))
        return 0
    import torch

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [_run(m, d, args) for d in devices for m in args.modes.split(",")]
    print(f"DP-SGD step vs non-private step: SegResNet init_filters 8, batch {args.batch}, "
          f"{args.patch}^3 patches, 4 channels, torch.set_num_threads(1), median of {args.repeats} "
          f"after {args.warmup} warm-up step(s); torch {torch.__version__}\n")
    print(_table(rows))
    print(f"\nreproduce: PYTHONPATH=. python benchmarks/dp_bench.py --batch {args.batch} --patch {args.patch} "
          f"--repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
