"""fedbrats: privacy-preserving federated brain-tumour segmentation.

Subcommands::

    fedbrats data synth  --out DIR --sites N --cases-per-site K --seed S [--labels 2021|2023] [--spacing MM]
    fedbrats provision   --federation NAME --sites site-1,site-2,... --aggregator HOST:PORT --out DIR [--localhost] [--force]
    fedbrats aggregator  --config aggregator.toml [--insecure]
    fedbrats node        --config site-1.toml [--insecure]
    fedbrats simulate    [--config FILE] --out DIR [--sites N] [--rounds R] [--data DIR]
                         [--secure-agg none|mask|ckks] [--drop SITE:STAGE ...] [--insecure]
    fedbrats privacy report --site-state DIR
    fedbrats experiment compare [--config FILE] --out DIR [--collude K] [--only CONF,...]
    fedbrats predict     --model FILE --case DIR --out FILE.nii.gz

Exit codes: 0 success; 1 other fedbrats error; 2 configuration error; 3 input data error (the
preflight lists every problem); 4 malformed payload; 5 protocol refusal; 6 round aborted
(too few sites); 7 aggregator unreachable; 8 privacy budget exhausted; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedbrats.errors import FedbratsError


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


def _load(path: str | None):
    from fedbrats.config import Config, load_config

    return load_config(path) if path else Config()


def cmd_data_synth(args) -> int:
    from node.synth import synthesize

    res = synthesize(Path(args.out), sites=args.sites, cases_per_site=args.cases_per_site,
                     seed=args.seed, labels=args.labels, spacing_mm=args.spacing,
                     progress=lambda m: print(m, flush=True))
    n = sum(len(v) for v in res.case_ids.values())
    print(f"wrote {n} case(s) for {len(res.case_ids)} site(s) to {res.out_dir} "
          f"(partitioning: {res.partitioning_csv})")
    return 0


def _warn_insecure(args) -> None:
    if getattr(args, "insecure", False):
        from fedbrats.transport import INSECURE_WARNING

        print(INSECURE_WARNING, file=sys.stderr, flush=True)


def cmd_provision(args) -> int:
    from fedbrats.provision import provision

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    base = _load(args.config) if args.config else None
    manifest = provision(Path(args.out), federation=args.federation, sites=sites,
                         aggregator=args.aggregator, base=base, localhost=args.localhost,
                         force=args.force, days=args.days)
    out = Path(args.out)
    print(f"federation {manifest['federation']}: CA, aggregator kit and {len(sites)} site kit(s) "
          f"written to {out}")
    print(f"  copy {out / 'aggregator'} to the aggregator host "
          f"(run: fedbrats aggregator --config aggregator.toml)")
    for s in sites:
        print(f"  copy {out / s} to {s} (set data.root in {s}.toml; run: fedbrats node --config "
              f"{s}.toml)")
    print(f"  keep {out / 'ca'} offline: it can issue certificates for the federation")
    return 0


def _check_environment() -> None:
    """Refuse bad environment settings at start-up, not mid-round.

    Raises:
        ConfigError: ``FEDBRATS_CRYPTO_THREADS`` is set but not an integer >= 1.
    """
    from crypto.errors import CryptoInputError
    from crypto.primitives import worker_threads
    from fedbrats.errors import ConfigError

    try:
        worker_threads()
    except CryptoInputError as exc:
        raise ConfigError("environment", [str(exc)]) from None


def cmd_aggregator(args) -> int:
    from aggregator.server import serve

    _check_environment()
    cfg = _load(args.config)
    _warn_insecure(args)
    return serve(cfg, insecure=args.insecure)


def cmd_node(args) -> int:
    from node.daemon import serve

    _check_environment()
    cfg = _load(args.config)
    _warn_insecure(args)
    return serve(cfg, insecure=args.insecure)


def cmd_simulate(args) -> int:
    from fedbrats.config import DROP_STAGES, with_overrides
    from fedbrats.errors import ConfigError
    from fedbrats.simulate import simulate

    _check_environment()
    cfg = _load(args.config)
    fed, data = {}, {}
    if args.sites is not None:
        fed["sites"] = args.sites
        fed["min_sites"] = min(cfg.federation.min_sites, args.sites)
    if args.rounds is not None:
        fed["rounds"] = args.rounds
    if args.data is not None:
        data["root"] = str(Path(args.data).expanduser().resolve())
    if args.secure_agg is not None:
        fed["secure_aggregation"] = args.secure_agg
    dpo = {}
    if args.dp is not None:
        dpo["mode"] = [] if args.dp.strip() in ("", "none") else [
            m.strip() for m in args.dp.split(",") if m.strip()]
    if fed or data or dpo:
        cfg = with_overrides(cfg, federation=fed, data=data, dp=dpo,
                             source=args.config or "the built-in default configuration")
    drops = {}
    for d in args.drop or []:
        site, sep, stage = d.partition(":")
        if not sep or not site or stage not in DROP_STAGES:
            raise ConfigError("--drop", [f"expected SITE:STAGE with STAGE one of "
                                         f"{', '.join(DROP_STAGES)}, got {d!r}"])
        drops[site] = stage
    _warn_insecure(args)
    return simulate(cfg, Path(args.out), insecure=args.insecure, drops=drops, force=args.force)


def cmd_privacy_report(args) -> int:
    from node.accounting import format_report, privacy_report

    print(format_report(privacy_report(Path(args.site_state))))
    return 0


def cmd_predict(args) -> int:
    from node.predict import predict_case

    out = predict_case(Path(args.model), Path(args.case), Path(args.out), device=args.device,
                       overwrite=args.force)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedbrats", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write synthetic BraTS-format data (ICBM152 anatomy)")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    s.add_argument("--cases-per-site", type=int, default=8, help="cases per site (default 8)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--labels", choices=["2021", "2023"], default="2021",
                   help="label convention and file naming (default 2021 / FeTS 2022)")
    s.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm")
    s.set_defaults(func=cmd_data_synth)

    pv = sub.add_parser("provision", help="create a federation: CA, certificates, identity "
                                          "keys and one kit per party")
    pv.add_argument("--federation", required=True, help="federation id")
    pv.add_argument("--sites", required=True, help="comma-separated site ids")
    pv.add_argument("--aggregator", required=True, help="HOST:PORT the sites connect to")
    pv.add_argument("--out", required=True, help="folder to create")
    pv.add_argument("--config", help="base config for the party TOMLs (default: built-in)")
    pv.add_argument("--localhost", action="store_true",
                    help="also accept localhost/127.0.0.1 in the aggregator certificate")
    pv.add_argument("--force", action="store_true", help="replace an existing federation")
    pv.add_argument("--days", type=int, default=825, help="certificate validity, days")
    pv.set_defaults(func=cmd_provision)

    insecure_help = "plaintext gRPC without authentication; prints a warning; debugging only"
    a = sub.add_parser("aggregator", help="run the aggregator daemon")
    a.add_argument("--config", required=True, help="aggregator TOML")
    a.add_argument("--insecure", action="store_true", help=insecure_help)
    a.set_defaults(func=cmd_aggregator)

    n = sub.add_parser("node", help="run a site node daemon")
    n.add_argument("--config", required=True, help="site TOML")
    n.add_argument("--insecure", action="store_true", help=insecure_help)
    n.set_defaults(func=cmd_node)

    sim = sub.add_parser("simulate", help="run a whole federation on 127.0.0.1 (real daemons)")
    sim.add_argument("--config", help="federation TOML (default: the embedded demo config)")
    sim.add_argument("--out", required=True, help="output folder")
    sim.add_argument("--sites", type=int, help="override federation.sites")
    sim.add_argument("--rounds", type=int, help="override federation.rounds")
    sim.add_argument("--data", help="BraTS/FeTS dataset folder (default: synthetic data)")
    sim.add_argument("--force", action="store_true",
                     help="replace a previous run in --out (its outputs are deleted)")
    sim.add_argument("--secure-agg", choices=["none", "mask", "ckks"],
                     help="override federation.secure_aggregation")
    sim.add_argument("--dp", metavar="MECH[,MECH]",
                     help="override dp.mode: 'none' or a comma list of dp-sgd, site-local, "
                          "site-distributed, svt, partial")
    sim.add_argument("--drop", action="append", metavar="SITE:STAGE",
                     help="fault injection: SITE vanishes when it reaches STAGE (repeatable)")
    sim.add_argument("--insecure", action="store_true",
                     help="skip the throwaway federation's mutual TLS (" + insecure_help + ")")
    sim.set_defaults(func=cmd_simulate)

    from experiments.compare import add_cli as add_experiment_cli

    add_experiment_cli(sub)

    pr = sub.add_parser("privacy", help="differential-privacy accounting")
    prsub = pr.add_subparsers(dest="privacy_command", required=True)
    rep = prsub.add_parser("report", help="epsilon spent, delta, budget left and mechanism "
                                          "parameters of one site")
    rep.add_argument("--site-state", required=True, help="the site's node.state_dir")
    rep.set_defaults(func=cmd_privacy_report)

    p = sub.add_parser("predict", help="segment one case with a trained model")
    p.add_argument("--model", required=True, help="model file (final_model.pt)")
    p.add_argument("--case", required=True, help="case folder with the four modalities")
    p.add_argument("--out", required=True, help="output segmentation .nii.gz")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when present, else CPU (default)")
    p.set_defaults(func=cmd_predict)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FedbratsError as exc:
        print(f"fedbrats {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
