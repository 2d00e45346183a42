"""``fedbrats simulate``: a whole federation on one machine, with the real daemons.

Starts one ``fedbrats aggregator`` process and N ``fedbrats node`` processes on 127.0.0.1 — the
same daemons, the same gRPC and the same code paths as a deployment, never an in-process
shortcut — waits for them while printing progress, and writes under ``--out DIR``:

- ``summary.json``: ``rounds_completed``, ``sites``, ``secure_aggregation``, ``dp`` {``mode``,
  ``epsilon``, ``delta``}, ``dice`` {``wt``, ``tc``, ``et``, ``mean``} (last round, mean over
  sites weighted by validation cases), ``wall_seconds``;
- ``metrics.jsonl`` (one line per round and site), ``events.jsonl``;
- ``logs/aggregator.log`` and ``logs/<site>.log``;
- ``final_model.pt`` and ``checkpoints/round-NNNN.pt``;
- ``configs/`` (the per-party TOML files it generated);
- ``federation/`` (a throwaway federation from ``fedbrats provision``: CA, certificates and
  identity keys; the daemons talk mutual TLS exactly as in production).

Without ``--data`` (and with ``data.root`` empty) synthetic BraTS data is generated first into
``data.synth.cache_dir`` and reused by later runs with the same parameters.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedbrats.config import Config, to_toml, with_overrides
from fedbrats.errors import ConfigError, FedbratsError

#: Seconds to wait for the aggregator to bind its port.
STARTUP_TIMEOUT_S = 120.0


def _say(msg: str) -> None:
    print(msg, flush=True)


def synth_cache_dir(cfg: Config) -> Path:
    """Where the synthetic data for ``cfg`` lives (one folder per parameter set)."""
    s = cfg.data.synth
    name = (f"sites{cfg.federation.sites}-cases{s.cases_per_site}-sp{s.spacing_mm:g}mm-"
            f"seed{cfg.federation.seed}-labels{cfg.data.labels}")
    return Path(s.cache_dir).expanduser() / name


def ensure_data(cfg: Config) -> Path:
    """Return the dataset root, synthesising it into the cache if ``data.root`` is empty."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser().resolve()
    from node import synth

    target = synth_cache_dir(cfg)
    params = dict(sites=cfg.federation.sites, cases_per_site=cfg.data.synth.cases_per_site,
                  seed=cfg.federation.seed, labels=cfg.data.labels,
                  spacing_mm=cfg.data.synth.spacing_mm)
    if target.exists() and synth.matches(target, **params):
        _say(f"synthetic data: reusing {target}")
        return target.resolve()
    if target.exists():
        shutil.rmtree(target)
    _say(f"synthetic data: generating {params['sites']} site(s) x {params['cases_per_site']} "
         f"case(s) at {params['spacing_mm']:g} mm into {target}")
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    synth.synthesize(tmp, progress=None, **params)
    os.replace(tmp, target)
    _say(f"synthetic data: done in {time.perf_counter() - t0:.1f} s")
    return target.resolve()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    f = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen([sys.executable, "-m", "fedbrats.cli", *args], stdout=f,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


class _Progress:
    """Prints new lines of metrics.jsonl and events.jsonl as they appear."""

    def __init__(self, out: Path, rounds: int):
        self.files = {"metrics": out / "metrics.jsonl", "events": out / "events.jsonl"}
        self.pos = {k: 0 for k in self.files}
        self.rounds = rounds

    def poll(self) -> None:
        for kind, path in self.files.items():
            if not path.exists():
                continue
            with open(path, encoding="utf-8") as f:
                f.seek(self.pos[kind])
                chunk = f.read()
            complete, _, _ = chunk.rpartition("\n")
            if not complete:
                continue
            self.pos[kind] += len(complete.encode()) + 1
            for line in complete.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                _say(self._fmt(kind, rec))

    def _fmt(self, kind: str, r: dict) -> str:
        if kind == "metrics":
            d = r.get("dice", {})
            return (f"        round {r['round']}/{self.rounds} result at {r['site']:<8} "
                    f"loss {_f(r.get('train_loss'))}"
                    f"  Dice WT {_f(d.get('wt'))} TC {_f(d.get('tc'))} ET {_f(d.get('et'))}"
                    f"  mean {_f(d.get('mean'))}")
        ev = r.get("event")
        if ev == "round_started":
            return (f"[{r['t']:5.0f} s] round {r['round']}/{self.rounds}: started at "
                    f"{', '.join(r['sites'])}")
        if ev == "round_aggregated":
            sec = r.get("secagg")
            extra = ""
            if sec:
                extra = f"; masked: U1 {sec['U1']}, U2 {sec['U2']}, U3 {sec['U3']}, U4 {sec['U4']}"
                if sec.get("dropped"):
                    extra += f", dropped after sharing keys: {', '.join(sec['dropped'])}"
            return (f"[{r['t']:5.0f} s] round {r['round']}/{self.rounds}: aggregated "
                    f"{len(r['sites'])} update(s) ({', '.join(r['sites'])}), mean train loss "
                    f"{_f(r.get('mean_train_loss'))}{extra}")
        if ev == "stage_deadline":
            return (f"[{r['t']:5.0f} s] round {r['round']}/{self.rounds}: stage {r['stage']} "
                    f"deadline passed without {', '.join(r['missing'])} (dropped)")
        if ev == "finished":
            return f"[{r['t']:5.0f} s] {'FAILED: ' if r.get('failed') else ''}{r.get('message')}"
        return json.dumps(r)


def _f(v) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _dp_banner(cfg: Config) -> str:
    """One line naming the DP mechanisms and their parameters (no secrets in it)."""
    dp = cfg.dp
    if not dp.mode:
        return "differential privacy: off (dp.mode = [])"
    parts = []
    if "dp-sgd" in dp.mode:
        sigma = (f"noise multiplier {dp.noise_multiplier:g}" if dp.noise_multiplier > 0
                 else f"target epsilon {dp.target_epsilon:g}")
        parts.append(f"DP-SGD ({sigma}, max grad norm {dp.max_grad_norm:g}, delta {dp.delta:g})")
    for m in ("site-local", "site-distributed"):
        if m in dp.mode:
            parts.append(f"{m} (update clip {dp.site_clip:g}, noise multiplier "
                         f"{dp.site_noise_multiplier:g}, delta {dp.site_delta:g})")
    parts += [m for m in dp.mode if m in ("svt", "partial")]
    return "differential privacy: " + "; ".join(parts)


def _ledger_epsilons(sites_dir: Path) -> dict[str, tuple[float, float]]:
    """Largest (ε, δ) per kind ("sample", "site") over the sites' privacy ledgers, which record
    every charge, including rounds that never finished.  Damaged ledgers are skipped here (the
    node itself refuses to start on one)."""
    if not sites_dir.is_dir():
        return {}
    from node.accounting import privacy_report

    best: dict[str, tuple[float, float]] = {}
    for d in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
        try:
            entries = privacy_report(d)["guarantees"]
        except FedbratsError:
            continue
        for e in entries:
            kind = {"sample-level": "sample", "site-level": "site"}.get(e["kind"])
            if kind and e["epsilon"] == e["epsilon"] and e["delta"]:  # skip NaN / no δ
                if kind not in best or e["epsilon"] > best[kind][0]:
                    best[kind] = (float(e["epsilon"]), float(e["delta"]))
    return best


def _dp_summary(cfg: Config, final: list[dict], sites_dir: Path | None = None) -> dict:
    """The ``dp`` block: mechanisms, and the largest ε any site spent (sample-level DP-SGD and
    site-level update noise, each with its δ): the larger of what the sites reported after the
    last round and what their ledgers in ``sites_dir`` record (which includes a round that
    failed after being charged).  ``epsilon``/``delta`` repeat the site-level pair when there
    is one (the guarantee about a whole site's data), else the sample-level pair (about one
    patient)."""
    modes = list(cfg.dp.mode)
    out: dict = {"mode": "+".join(modes) if modes else "none"}
    ledgers = _ledger_epsilons(sites_dir) if (sites_dir is not None and modes) else {}
    for kind in ("sample", "site"):
        eps = [r["dp"][f"epsilon_{kind}"] for r in final
               if r.get("dp") and r["dp"].get(f"epsilon_{kind}") is not None]
        dl = [r["dp"][f"delta_{kind}"] for r in final
              if r.get("dp") and r["dp"].get(f"delta_{kind}") is not None]
        if kind in ledgers:
            eps.append(ledgers[kind][0])
            dl.append(ledgers[kind][1])
        out[f"epsilon_{kind}"] = round(max(eps), 4) if eps else None
        out[f"delta_{kind}"] = max(dl) if dl else None
    primary = "site" if out["epsilon_site"] is not None else "sample"
    out["epsilon"], out["delta"] = out[f"epsilon_{primary}"], out[f"delta_{primary}"]
    return out


def summarize(out: Path, cfg: Config, wall_seconds: float, *, insecure: bool = False) -> dict:
    """Build ``summary.json`` from ``metrics.jsonl`` (see module docstring)."""
    recs = []
    mpath = out / "metrics.jsonl"
    if mpath.exists():
        recs = [json.loads(ln) for ln in mpath.read_text(encoding="utf-8").splitlines() if ln.strip()]
    last = max((r["round"] for r in recs), default=0)
    final = [r for r in recs if r["round"] == last]
    dice: dict[str, float | None] = {}
    for k in ("wt", "tc", "et", "mean"):
        vals = [(r["dice"].get(k), max(1, r.get("num_val_cases", 1))) for r in final]
        vals = [(v, w) for v, w in vals if v is not None]
        tot = sum(w for _, w in vals)
        dice[k] = round(sum(v * w for v, w in vals) / tot, 4) if tot else None
    events = []
    epath = out / "events.jsonl"
    if epath.exists():
        events = [json.loads(ln) for ln in epath.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rounds_done = max((e["round"] for e in events if e.get("event") == "round_aggregated"),
                      default=0)
    return {
        "federation": cfg.federation.name,
        "rounds_completed": rounds_done,
        "rounds_planned": cfg.federation.rounds,
        # Every site of the federation; the Dice figures average those that evaluated the last
        # round's model (sites_evaluated), a site that dropped out is not among them.
        "sites": [f"site-{i}" for i in range(1, cfg.federation.sites + 1)],
        "sites_evaluated": sorted({r["site"] for r in final}),
        "secure_aggregation": cfg.federation.secure_aggregation,
        "transport": "insecure" if insecure else "mtls",
        "dp": _dp_summary(cfg, final, out / "sites"),
        "dice": dice,
        "dice_per_site": {r["site"]: r["dice"] for r in final},
        "wall_seconds": round(wall_seconds, 1),
    }


def simulate(cfg: Config, out: Path, *, insecure: bool = False,
             drops: dict[str, str] | None = None, force: bool = False) -> int:
    """Run the federation described by ``cfg``; see the module docstring.

    Returns:
        0 when every daemon finished cleanly, else the first non-zero exit code.

    Raises:
        FedbratsError: data could not be prepared or the aggregator did not start.
    """
    t_start = time.perf_counter()
    drops = dict(drops or {})
    unknown = [s for s in drops if s not in {f"site-{i}" for i in range(1, cfg.federation.sites + 1)}]
    stages = {"none": ("training", "result"), "ckks": ("training", "result")}.get(
        cfg.federation.secure_aggregation,
        ("advertise_keys", "share_keys", "masked_input", "unmask", "result"))
    bad = [f"{site}:{stage}" for site, stage in drops.items() if stage not in stages]
    problems = []
    if unknown:
        problems.append(f"unknown site(s) {', '.join(unknown)}: the simulation has "
                        f"site-1..site-{cfg.federation.sites}")
    if bad:
        problems.append(f"{', '.join(bad)}: secure_aggregation = "
                        f"{cfg.federation.secure_aggregation!r} has no such stage (its stages: "
                        f"{', '.join(stages)})")
    if problems:
        raise ConfigError("--drop", problems)
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        ours = {"metrics.jsonl", "events.jsonl", "summary.json", "final_model.pt",
                "aggregator.port", "resume.json", "checkpoints", "logs", "configs", "sites",
                "federation"}
        present = {p.name for p in out.iterdir()}
        if not force:
            raise FedbratsError(f"--out {out} is not empty; refusing to overwrite a previous run "
                                f"(pass --force to replace it, or choose another folder)")
        foreign = sorted(present - ours)
        if foreign:
            raise FedbratsError(f"--out {out} holds files that are not a fedbrats run "
                                f"({', '.join(foreign[:5])}); refusing to delete them even with "
                                f"--force")
        for name in present:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    root = ensure_data(cfg)
    cfg = replace(cfg, data=replace(cfg.data, root=str(root)))

    sites = [f"site-{i}" for i in range(1, cfg.federation.sites + 1)]
    kits = out / "federation"
    from fedbrats.provision import provision

    # A throwaway federation: CA, mTLS certificates and Ed25519 identities, as in production.
    provision(kits, federation=cfg.federation.name, sites=sites, aggregator="127.0.0.1:0",
              base=cfg, localhost=True)
    tls: dict[str, dict] = {}
    if not insecure:
        tls["aggregator"] = {"ca_cert": str(kits / "aggregator" / "ca.crt"),
                             "cert": str(kits / "aggregator" / "aggregator.crt"),
                             "key": str(kits / "aggregator" / "aggregator.key"),
                             "server_name": ""}
        for s in sites:
            tls[s] = {"ca_cert": str(kits / s / "ca.crt"), "cert": str(kits / s / f"{s}.crt"),
                      "key": str(kits / s / f"{s}.key"), "server_name": "127.0.0.1"}
    flag = ["--insecure"] if insecure else []
    ckks_ctx = {}
    if (kits / "aggregator" / "ckks-public.ctx").exists():
        ckks_ctx["aggregator"] = {"context": str(kits / "aggregator" / "ckks-public.ctx")}
        for s in sites:
            ckks_ctx[s] = {"context": str(kits / s / "ckks-secret.ctx")}
    agg_cfg = with_overrides(cfg, aggregator={"host": "127.0.0.1", "port": 0, "out_dir": str(out),
                                              "allowed_sites": sites},
                             tls=tls.get("aggregator", {}), ckks=ckks_ctx.get("aggregator", {}))
    agg_toml = out / "configs" / "aggregator.toml"
    agg_toml.write_text(to_toml(agg_cfg), encoding="utf-8")
    procs: dict[str, subprocess.Popen] = {}

    def _on_term(signum, frame):  # stop the daemons too, as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    _say(f"federation {cfg.federation.name}: {cfg.federation.sites} site(s), "
         f"{cfg.federation.rounds} round(s), secure aggregation {cfg.federation.secure_aggregation}, "
         f"transport {'PLAINTEXT (--insecure)' if insecure else 'mutual TLS'}; logs in {out / 'logs'}")
    _say(_dp_banner(cfg))
    try:
        procs["aggregator"] = _spawn(["aggregator", "--config", str(agg_toml), *flag],
                                     out / "logs" / "aggregator.log")
        port_file = out / "aggregator.port"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not port_file.exists():
            if procs["aggregator"].poll() is not None:
                raise FedbratsError("aggregator exited during start-up:\n"
                                    + _tail(out / "logs" / "aggregator.log"))
            if time.monotonic() > deadline:
                raise FedbratsError(f"aggregator did not start within {STARTUP_TIMEOUT_S:g} s; "
                                    f"see {out / 'logs' / 'aggregator.log'}")
            time.sleep(0.2)
        port = int(port_file.read_text().strip())
        for site in sites:
            node_cfg = with_overrides(cfg, node={
                "site_id": site, "aggregator": f"127.0.0.1:{port}",
                "state_dir": str(out / "sites" / site),
                "identity_key": str(kits / site / "identity.key"),
                "identities_dir": str(kits / site / "identities"),
                "drop_at": drops.get(site, "")},
                tls=tls.get(site, {}), ckks=ckks_ctx.get(site, {}))
            path = out / "configs" / f"{site}.toml"
            path.write_text(to_toml(node_cfg), encoding="utf-8")
            procs[site] = _spawn(["node", "--config", str(path), *flag],
                                 out / "logs" / f"{site}.log")
        progress = _Progress(out, cfg.federation.rounds)
        codes: dict[str, int] = {}
        while len(codes) < len(procs):
            progress.poll()
            for name, p in procs.items():
                if name not in codes and p.poll() is not None:
                    codes[name] = p.returncode
                    if p.returncode != 0:
                        _say(f"{name} exited with code {p.returncode}; last lines of "
                             f"{out / 'logs' / (name + '.log')}:\n"
                             + _tail(out / "logs" / f"{name}.log"))
                        if name == "aggregator" or len([c for c in codes.values() if c != 0]) > \
                                cfg.federation.sites - cfg.federation.min_sites:
                            _stop(procs)
            time.sleep(0.5)
        progress.poll()
    except KeyboardInterrupt:
        _say("interrupted; stopping the daemons")
        _stop(procs)
        return 130
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, previous)
    if cfg.federation.secure_aggregation == "ckks":
        # Only the sites hold the model in ckks mode; the simulation keeps site-1's copy.
        site_model = out / "sites" / "site-1" / "final_model.pt"
        if site_model.exists():
            shutil.copyfile(site_model, out / "final_model.pt")
    wall = time.perf_counter() - t_start
    summary = summarize(out, cfg, wall, insecure=insecure)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    d = summary["dice"]
    _say(f"done in {wall:.0f} s: {summary['rounds_completed']} round(s); final Dice WT "
         f"{_f(d['wt'])} TC {_f(d['tc'])} ET {_f(d['et'])} mean {_f(d['mean'])}")
    dp = summary["dp"]
    if dp["mode"] != "none":
        def _eps(kind: str) -> str:
            e = dp[f"epsilon_{kind}"]
            return "n/a" if e is None else f"{e:.4g} (delta {dp[f'delta_{kind}']:g})"

        _say(f"differential privacy ({dp['mode']}): epsilon sample-level {_eps('sample')}, "
             f"site-level {_eps('site')}")
        worst = max((e for e in (dp["epsilon_sample"], dp["epsilon_site"]) if e is not None), default=0)
        if worst > 10:
            _say("  an epsilon this large is no meaningful formal guarantee: the noise is too weak "
                 "for the data (see README, 'Differential privacy')")
    model = out / "final_model.pt"
    _say(f"summary: {out / 'summary.json'}  "
         + (f"model: {model}" if model.exists() else "no final model (the federation did not finish)"))
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        return next(iter(bad.values()))
    return 0
