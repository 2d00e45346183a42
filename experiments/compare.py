"""``fedbrats experiment compare``: the privacy each configuration buys and the accuracy it costs.

One command runs the federation — the real daemons, over mutual TLS, via
:func:`fedbrats.simulate.simulate` — under each configuration, on the same data and seed:

============== ============================ ===================================================
configuration  secure aggregation           differential privacy (``dp.mode``)
============== ============================ ===================================================
none           none (plaintext FedAvg)      —
dp-only        none                         ``[experiment] dp_only_mode`` (DP-SGD + site-local)
secagg-mask    mask (pairwise masking)      —
secagg-ckks    ckks (homomorphic sum)       —
dp+secagg      ``dp_secagg_aggregation``    ``dp_secagg_mode`` (DP-SGD + site-distributed)
============== ============================ ===================================================

Each configuration keeps everything its aggregator received (``aggregator.record_dir =
DIR/<conf>/received``) and records Dice per region, ε (sample- and site-level, from
``summary.json`` or the sites' privacy ledgers), payload bytes on the wire and wall time.  Then
the aggregator — honest but curious, optionally colluding with ``--collude K`` sites — attacks
what it received (:mod:`experiments.studies`): membership and property inference on the
federation's own updates and models, update inversion and update-level membership inference on a
small model.  ``DIR/report.md``, ``DIR/results.csv`` and the plots (:mod:`experiments.report`,
:mod:`experiments.plots`) cover every configuration in ``DIR`` that ran with the same base
configuration and the same ``--collude``.

A configuration whose federation already ran in ``DIR`` with the same configuration is not run
again (only its attacks, if their settings changed); ``--force`` reruns everything asked for.

The config file is a fedbrats TOML (``experiments/default.toml`` by default) with an optional
``[experiment]`` table (:class:`ExperimentSettings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbrats.config import Config, config_from_dict, to_toml, with_overrides
from fedbrats.errors import ConfigError, FedbratsError

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
"""The default experiment configuration (3 sites x 8 cases at 3 mm, 4 rounds)."""

CONFIGURATIONS = ("none", "dp-only", "secagg-mask", "secagg-ckks", "dp+secagg")
"""The issue's configurations, in report order."""

SWEEP_PREFIX = "dp+secagg@"
"""``dp+secagg@σ``: ``dp+secagg`` with both noise multipliers set to σ (``[experiment] dp_sweep``)."""

ATTACKS_VERSION = 2
"""Bumped when the attacks change, so that ``compare`` reruns them on an existing DIR."""


@dataclass(frozen=True)
class ExperimentSettings:
    """The ``[experiment]`` table of the config file.

    Attributes:
        configurations: which configurations to run (subset of :data:`CONFIGURATIONS`).
        dp_sweep: extra points of the privacy–utility curve: for each σ, a configuration
            ``dp+secagg@σ`` = ``dp+secagg`` with ``dp.noise_multiplier`` and
            ``dp.site_noise_multiplier`` set to σ.
        dp_only_mode: ``dp.mode`` of ``dp-only`` (secure aggregation ``none``).
        dp_secagg_mode: ``dp.mode`` of ``dp+secagg``.
        dp_secagg_aggregation: secure aggregation of ``dp+secagg`` (``mask`` or ``ckks``).
        extra_cases_per_site: fresh non-member cases per site drawn from the site's own profile.
        heldout_cases: cases of a held-out site (auxiliary data of the attacker).
        inversion_patch: side of the 2D patches of the small-model studies, pixels.
        inversion_hidden: hidden units of the small model.
        inversion_steps: gradient-matching iterations.
        inversion_lr: learning rate of the sites' SGD step in the small-model studies.
        attack_seed: seed of the attacks (small model, reconstructions, bootstrap, noise).
        attack_threads: torch threads for the attacks (0 = torch's default).
    """

    configurations: tuple[str, ...] = CONFIGURATIONS
    dp_sweep: tuple[float, ...] = (1.0, 0.1)
    dp_only_mode: tuple[str, ...] = ("dp-sgd", "site-local")
    dp_secagg_mode: tuple[str, ...] = ("dp-sgd", "site-distributed")
    dp_secagg_aggregation: str = "mask"
    extra_cases_per_site: int = 8
    heldout_cases: int = 8
    inversion_patch: int = 32
    inversion_hidden: int = 64
    inversion_steps: int = 300
    inversion_lr: float = 0.1
    attack_seed: int = 0
    attack_threads: int = 1

    def attack_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("configurations", "dp_sweep", "attack_threads"):
            d.pop(k)
        return d


def _settings_from(raw: dict, source: str) -> ExperimentSettings:
    problems: list[str] = []
    known = {f.name: f for f in dataclasses.fields(ExperimentSettings)}
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"experiment.{key}: unknown key (known: {', '.join(sorted(known))})")
            continue
        if key == "dp_sweep":
            if not isinstance(value, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
                problems.append(f"experiment.dp_sweep: expected a list of noise multipliers > 0, "
                                f"got {value!r}")
                continue
            kw[key] = tuple(float(v) for v in value)
            continue
        default = getattr(ExperimentSettings(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"experiment.{key}: expected a list of strings, got {value!r}")
                continue
            kw[key] = tuple(value)
        elif isinstance(default, bool) or isinstance(value, bool):
            problems.append(f"experiment.{key}: expected {type(default).__name__}, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(value, int):
                problems.append(f"experiment.{key}: expected an integer, got {value!r}")
                continue
            kw[key] = value
        elif isinstance(default, float):
            if not isinstance(value, (int, float)):
                problems.append(f"experiment.{key}: expected a number, got {value!r}")
                continue
            kw[key] = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                problems.append(f"experiment.{key}: expected a string, got {value!r}")
                continue
            kw[key] = value
    s = ExperimentSettings(**kw)
    bad = [c for c in s.configurations if c not in CONFIGURATIONS]
    if bad:
        problems.append(f"experiment.configurations: unknown {bad} (known: {', '.join(CONFIGURATIONS)})")
    if s.dp_secagg_aggregation not in ("mask", "ckks"):
        problems.append(f"experiment.dp_secagg_aggregation: must be 'mask' or 'ckks', got "
                        f"{s.dp_secagg_aggregation!r}")
    for name in ("extra_cases_per_site", "heldout_cases", "attack_threads"):
        if getattr(s, name) < 0:
            problems.append(f"experiment.{name}: must be >= 0, got {getattr(s, name)}")
    if s.inversion_patch < 4:
        problems.append(f"experiment.inversion_patch: must be >= 4, got {s.inversion_patch}")
    for name in ("inversion_hidden", "inversion_steps"):
        if getattr(s, name) < 1:
            problems.append(f"experiment.{name}: must be >= 1, got {getattr(s, name)}")
    if s.inversion_lr <= 0:
        problems.append(f"experiment.inversion_lr: must be > 0, got {s.inversion_lr}")
    if problems:
        raise ConfigError(source, problems)
    return s


def load_experiment(path: Path | None) -> tuple[Config, ExperimentSettings]:
    """Read a fedbrats config with an optional ``[experiment]`` table (default: ``default.toml``).

    Raises:
        ConfigError: unreadable file, invalid TOML, or invalid fields (all listed).
    """
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    exp_raw = raw.pop("experiment", {})
    if not isinstance(exp_raw, dict):
        raise ConfigError(str(p), ["experiment: expected a table"])
    settings = _settings_from(exp_raw, str(p))
    cfg = config_from_dict(raw, source=str(p), base=p.resolve().parent)
    return cfg, settings


def sweep_name(sigma: float) -> str:
    """Name of the ``dp_sweep`` configuration with noise multiplier ``sigma``."""
    return f"{SWEEP_PREFIX}{sigma:g}"


def all_configurations(settings: ExperimentSettings) -> list[str]:
    """The configurations a plain ``compare`` runs: the chosen ones and the DP sweep."""
    return [*settings.configurations, *(sweep_name(v) for v in settings.dp_sweep)]


def order_key(name: str) -> tuple:
    """Report order: the issue's configurations, then the sweep from the largest σ down."""
    if name in CONFIGURATIONS:
        return (0, CONFIGURATIONS.index(name), 0.0)
    try:
        return (1, 0, -float(name[len(SWEEP_PREFIX):]))
    except ValueError:
        return (2, 0, 0.0)


def configuration(name: str, settings: ExperimentSettings
                  ) -> tuple[str, tuple[str, ...], str, dict[str, float]]:
    """``(secure_aggregation, dp.mode, description, other dp overrides)`` of a configuration."""
    if name == "none":
        return "none", (), "plaintext FedAvg, no DP", {}
    if name == "dp-only":
        return "none", settings.dp_only_mode, "plaintext FedAvg with DP at the sites", {}
    if name == "secagg-mask":
        return "mask", (), "secure aggregation by pairwise masking, no DP", {}
    if name == "secagg-ckks":
        return "ckks", (), "homomorphic aggregation (CKKS), no DP", {}
    if name == "dp+secagg":
        return (settings.dp_secagg_aggregation, settings.dp_secagg_mode,
                "distributed DP under secure aggregation", {})
    if name.startswith(SWEEP_PREFIX):
        try:
            sigma = float(name[len(SWEEP_PREFIX):])
        except ValueError:
            sigma = -1.0
        if sigma > 0 and math.isfinite(sigma):
            return (settings.dp_secagg_aggregation, settings.dp_secagg_mode,
                    f"dp+secagg with both noise multipliers σ = {sigma:g}",
                    {"noise_multiplier": sigma, "site_noise_multiplier": sigma})
    raise ConfigError("--only", [f"unknown configuration {name!r} (known: "
                                 f"{', '.join(CONFIGURATIONS)}, {SWEEP_PREFIX}<sigma>)"])


def configuration_config(base: Config, name: str, settings: ExperimentSettings, run_dir: Path) -> Config:
    """The federation config of configuration ``name``, recording into ``run_dir/received``."""
    secure, modes, _, dp_extra = configuration(name, settings)
    return with_overrides(base, federation={"secure_aggregation": secure},
                          dp={"mode": list(modes), **dp_extra},
                          aggregator={"record_dir": str(run_dir / "received")})


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def privacy_spent(summary: dict, run_dir: Path, requested: tuple[str, ...]) -> dict:
    """ε and δ of a run: ``summary.json``'s ``dp`` block, else the sites' privacy ledgers.

    Returns:
        ``{"mode", "applied", "epsilon_sample", "epsilon_site", "delta", "source"}``; ε values
        are None when unknown.
    """
    dp = summary.get("dp") or {}
    mode = dp.get("mode")
    if isinstance(mode, (list, tuple)):
        modes = [str(m) for m in mode]
    else:
        modes = [m.strip() for m in str(mode or "").replace(",", "+").split("+")]
    modes = [m for m in modes if m not in ("none", "")]
    out = {"mode": modes, "requested": list(requested), "applied": bool(modes),
           "epsilon_sample": dp.get("epsilon_sample"), "epsilon_site": dp.get("epsilon_site"),
           "delta_sample": dp.get("delta_sample"), "delta_site": dp.get("delta_site"),
           "delta": dp.get("delta"), "source": "summary.json"}
    eps = dp.get("epsilon")
    if eps is not None and out["epsilon_sample"] is None and out["epsilon_site"] is None:
        key = "epsilon_sample" if "dp-sgd" in modes else "epsilon_site"
        out[key] = eps
    if out["epsilon_sample"] is None and out["epsilon_site"] is None:
        try:
            from node.accounting import privacy_report
        except ImportError:
            return out
        found: dict[str, list[float]] = {"sample-level": [], "site-level": []}
        for site_dir in sorted((run_dir / "sites").glob("*")):
            try:
                rep = privacy_report(site_dir)
            except Exception:  # noqa: BLE001 - a damaged or absent ledger is reported as n/a
                continue
            for g in rep.get("guarantees", []):
                if g.get("kind") in found and g.get("epsilon") is not None:
                    found[g["kind"]].append(float(g["epsilon"]))
        if found["sample-level"] or found["site-level"]:
            out["source"] = "the sites' privacy ledgers (largest ε over sites)"
            out["applied"] = True
            out["mode"] = out["mode"] or list(requested)
            if found["sample-level"]:
                out["epsilon_sample"] = max(found["sample-level"])
            if found["site-level"]:
                out["epsilon_site"] = max(found["site-level"])
    return out


def _update_norms(run_dir: Path, rounds: int) -> list[float]:
    """‖Δ‖₂ of every recorded plaintext update (``none`` mode)."""
    norms = []
    for r in range(1, rounds + 1):
        for f in sorted((run_dir / "received" / f"round-{r:04d}").glob("*-training.npz")):
            with np.load(f) as z:
                if any(k.startswith("ct.") for k in z.files):
                    return []
                norms.append(float(math.sqrt(sum(float(np.sum(z[k].astype(np.float64) ** 2))
                                                  for k in z.files))))
    return norms


def _run_federation(cfg: Config, run_dir: Path, fed_fp: str, progress) -> dict:
    from fedbrats.simulate import simulate

    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    try:
        rc = simulate(cfg, run_dir, force=False)
    except FedbratsError as exc:
        progress(f"    the federation failed: {exc}")
        rc = exc.exit_code
    wall = time.perf_counter() - t0
    info = {"federation_fingerprint": fed_fp, "exit_code": rc, "wall_seconds": wall}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _cipher_bytes(run_dir: Path, sites: list[str]) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for s in sites:
        f = run_dir / "received" / "round-0001" / f"{s}-training.npz"
        try:
            with np.load(f) as z:
                names = sorted(k for k in z.files if k.startswith("ct."))
                out[s] = np.concatenate([z[k] for k in names]) if names else None
        except OSError:
            out[s] = None
    return out


def _attack(name: str, cfg: Config, run_dir: Path, data, settings: ExperimentSettings,
            collude: int, progress) -> dict:
    """Every attack on configuration ``name``'s recorded run; returns the results dict."""
    import torch

    threads = torch.get_num_threads()
    if settings.attack_threads:
        torch.set_num_threads(settings.attack_threads)
    try:
        return _attack_all(name, cfg, run_dir, data, settings, collude, progress)
    finally:
        torch.set_num_threads(threads)


def _attack_all(name: str, cfg: Config, run_dir: Path, data, settings: ExperimentSettings,
                collude: int, progress) -> dict:
    from experiments import received, studies

    t0 = time.perf_counter()
    progress(f"  [{name}] attacks as the aggregator"
             + (f" with {collude} colluding site(s)" if collude else ""))
    obs = received.observe(run_dir, cfg, sites=data.sites, weights=data.weights, collude=collude,
                           progress=progress)
    ev = studies._Evaluator(cfg)
    progress(f"    membership inference on the federation ({obs.basis})")
    fmia = studies.federation_mia(obs, data, cfg, seed=settings.attack_seed, evaluator=ev)
    progress("    property inference")
    prop = studies.property_inference(obs, data, cfg, evaluator=ev)
    prot = studies.protection_of(cfg, data)
    progress(f"    small-model studies ({prot.label})")
    small = studies.small_model_studies(
        cfg, data, prot, collude=collude, cipher=_cipher_bytes(run_dir, data.sites)
        if cfg.federation.secure_aggregation == "ckks" else {},
        patch=settings.inversion_patch, hidden=settings.inversion_hidden,
        steps=settings.inversion_steps, lr=settings.inversion_lr, seed=settings.attack_seed,
        progress=progress)
    fig = small.pop("figure")
    np.savez_compressed(run_dir / "inversion.npz", **fig)
    return {"observation": {"basis": obs.basis, "colluders": obs.colluders, "exact": obs.exact,
                            "notes": obs.notes, "units": [u.name for u in obs.units]},
            "federation_mia": fmia, "property": prop, **small,
            "attack_seconds": time.perf_counter() - t0}


def _results_of(out: Path) -> list[dict]:
    res = []
    for f in out.glob("*/results.json"):
        try:
            res.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(res, key=lambda r: order_key(r.get("configuration", "")))


def compare(config_path: Path | None, out: Path, *, collude: int = 0,
            configurations: list[str] | None = None, progress=print, force: bool = False) -> Path:
    """Run the configurations, attack what each aggregator received, write the report.

    Args:
        config_path: experiment config (fedbrats TOML + optional ``[experiment]``); None =
            ``experiments/default.toml``.
        out: the experiment folder; ``out/<configuration>/`` holds each run.
        collude: number of sites K (0 ≤ K ≤ n − 1) that hand their own inputs (or, in ckks
            mode, their copy of the shared key) to the aggregator.
        configurations: subset to run (default: ``[experiment] configurations``).
        progress: called with one line of progress at a time.
        force: rerun federations and attacks even when ``out`` holds matching results.

    Returns:
        The path of ``out/report.md``.

    Raises:
        ConfigError: invalid config, configuration names or ``collude``.
        FedbratsError: the data could not be prepared.
    """
    from experiments import casedata, plots, report
    from fedbrats.simulate import ensure_data

    t_start = time.perf_counter()
    base, settings = load_experiment(config_path)
    names = list(configurations) if configurations else all_configurations(settings)
    for n in names:
        configuration(n, settings)  # raises on unknown names
    names = sorted(dict.fromkeys(names), key=order_key)
    sites = base.federation.sites
    if not 0 <= collude <= sites - 1:
        raise ConfigError("--collude", [f"must be between 0 and sites - 1 = {sites - 1}, got {collude}"])
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_fp = _digest(to_toml(with_overrides(base, aggregator={"record_dir": ""})))
    progress(f"experiment: {len(names)} configuration(s) ({', '.join(names)}), {sites} sites, "
             f"{base.federation.rounds} rounds, collude {collude}; results in {out}")

    root = ensure_data(base)
    data = casedata.prepare(base, root, extra_cases=settings.extra_cases_per_site,
                            heldout_cases=settings.heldout_cases,
                            patch2d=settings.inversion_patch, progress=progress)
    progress(f"attack data: {sum(len(v) for v in data.train.values())} member case(s), "
             f"{sum(len(v) + len(data.fresh[k]) for k, v in data.val.items())} same-site "
             f"non-member case(s), {len(data.heldout)} held-out case(s)")

    for i, name in enumerate(names, 1):
        run_dir = out / name
        cfg = configuration_config(base, name, settings, run_dir)
        fed_fp = _digest(base_fp, to_toml(with_overrides(cfg, aggregator={"record_dir": ""})))
        att_fp = _digest(fed_fp, settings.attack_dict(), collude, ATTACKS_VERSION)
        info_path = run_dir / "experiment.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else None
        res_path = run_dir / "results.json"
        if not force and info and info.get("federation_fingerprint") != fed_fp:
            raise FedbratsError(f"{run_dir} holds a run of another configuration; pass --force "
                                f"to replace it, or choose another --out")
        if not force and not info and run_dir.exists() and any(run_dir.iterdir()):
            raise FedbratsError(f"{run_dir} exists and is not an experiment run; refusing to "
                                f"delete it (pass --force, or choose another --out)")
        if force or not info or not (run_dir / "summary.json").exists():
            progress(f"== [{i}/{len(names)}] {name}: running the federation")
            info = _run_federation(cfg, run_dir, fed_fp, progress)
        else:
            progress(f"== [{i}/{len(names)}] {name}: reusing the federation in {run_dir}")
        old = json.loads(res_path.read_text(encoding="utf-8")) if res_path.exists() else None
        if not force and old and old.get("fingerprints", {}).get("attacks") == att_fp:
            progress(f"  [{name}] reusing the attack results")
            continue
        summary = {}
        if (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        secure, modes, desc, _ = configuration(name, settings)
        result: dict[str, Any] = {
            "configuration": name, "description": desc, "secure_aggregation": secure,
            "collude": collude, "fingerprints": {"base": base_fp, "federation": fed_fp,
                                                 "attacks": att_fp},
            "exit_code": info.get("exit_code"),
            "rounds_completed": summary.get("rounds_completed", 0),
            "rounds_planned": base.federation.rounds, "sites": data.sites,
            "dice": summary.get("dice", {}), "dice_per_site": summary.get("dice_per_site", {}),
            "federation_seconds": summary.get("wall_seconds", info.get("wall_seconds")),
            "dp": privacy_spent(summary, run_dir, modes),
            "dp_config": dataclasses.asdict(cfg.dp),
            "data": {"source": data.source, "truth": data.truth,
                     "members": sum(len(v) for v in data.train.values())},
        }
        ok = info.get("exit_code") == 0 and result["rounds_completed"] >= 1
        result["status"] = "ok" if ok else "failed"
        if ok:
            from aggregator.server import initial_global_model
            from experiments import received

            model_bytes = sum(int(v.nbytes) for v in initial_global_model(cfg).values())
            result["wire"] = received.wire_bytes(run_dir, cfg, model_bytes=model_bytes,
                                                 sites=data.sites)
            norms = _update_norms(run_dir, result["rounds_completed"]) if secure == "none" else []
            if norms:
                result["update_norms"] = {"median": float(np.median(norms)), "min": min(norms),
                                          "max": max(norms), "site_clip": cfg.dp.site_clip}
            try:
                result.update(_attack(name, cfg, run_dir, data, settings, collude, progress))
            except FedbratsError as exc:
                progress(f"  [{name}] attacks failed: {exc}")
                result["status"] = "attacks failed"
                result["error"] = str(exc)
        res_path.write_text(json.dumps(_clean(result), indent=2) + "\n", encoding="utf-8")

    results = [r for r in _results_of(out)
               if r.get("fingerprints", {}).get("base") == base_fp and r.get("collude") == collude]
    context = {"config": str(Path(config_path).resolve() if config_path else DEFAULT_CONFIG),
               "collude": collude, "sites": data.sites, "rounds": base.federation.rounds,
               "settings": dataclasses.asdict(settings), "data_source": data.source,
               "cases_per_site": base.data.synth.cases_per_site,
               "spacing_mm": base.data.synth.spacing_mm, "synthetic": not base.data.root,
               "wall_seconds": time.perf_counter() - t_start,
               "compute_seconds": sum((r.get("federation_seconds") or 0) + (r.get("attack_seconds") or 0)
                                      for r in results),
               "base_config": {"local_steps": base.training.local_steps,
                               "patch_size": list(base.training.patch_size),
                               "batch_size": base.training.batch_size,
                               "model": base.model.preset}}
    plot_files = plots.make_plots(out, results, context)
    path = report.write_report(out, results, context, plot_files)
    progress(f"experiment done in {time.perf_counter() - t_start:.0f} s: {path}, "
             f"{out / 'results.csv'}, {', '.join(p.name for p in plot_files)}")
    return path


# ---------------------------------------------------------------------------------------------
# CLI


def cmd_compare(args: argparse.Namespace) -> int:
    only = None
    if args.only:
        only = [s.strip() for part in args.only for s in part.split(",") if s.strip()]
    compare(Path(args.config) if args.config else None, Path(args.out), collude=args.collude,
            configurations=only, force=args.force,
            progress=lambda m: print(m, flush=True))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment compare`` to the ``fedbrats`` command line (``subparsers`` of the top
    parser); the subcommand sets ``func`` to :func:`cmd_compare`."""
    exp = subparsers.add_parser("experiment", help="threat-model experiments")
    esub = exp.add_subparsers(dest="experiment_command", required=True)
    c = esub.add_parser(
        "compare", help="run the federation under each privacy configuration, attack what the "
                        "aggregator received, write report.md, results.csv and plots")
    c.add_argument("--config", help="experiment TOML (default: experiments/default.toml)")
    c.add_argument("--out", required=True, help="experiment folder")
    c.add_argument("--collude", type=int, default=0, metavar="K",
                   help="the aggregator also gets the inputs of K sites (default 0)")
    c.add_argument("--only", action="append", metavar="CONF[,CONF]",
                   help=f"run only these configurations ({', '.join(CONFIGURATIONS)}, "
                        f"{SWEEP_PREFIX}SIGMA)")
    c.add_argument("--force", action="store_true",
                   help="rerun federations and attacks even if DIR holds matching results")
    c.set_defaults(func=cmd_compare)
