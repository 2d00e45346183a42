"""The ``fedbrats`` command line.

Subcommands::

    fedbrats data synth  --out DIR --sites N --cases-per-site K --seed S [--labels 2021|2023] [--spacing MM]
    fedbrats aggregator  --config aggregator.toml
    fedbrats node        --config site-1.toml
    fedbrats simulate    [--config FILE] --out DIR [--sites N] [--rounds R] [--data DIR]
    fedbrats predict     --model FILE --case DIR --out FILE.nii.gz

Exit codes: 0 success; 1 other fedbrats error; 2 configuration error; 3 input data error (the
preflight lists every problem); 4 malformed payload; 5 protocol refusal; 6 round aborted
(too few sites); 7 aggregator unreachable; 130 interrupted.
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


def cmd_aggregator(args) -> int:
    from aggregator.server import serve

    return serve(_load(args.config))


def cmd_node(args) -> int:
    from node.daemon import serve

    return serve(_load(args.config))


def cmd_simulate(args) -> int:
    from fedbrats.config import with_overrides
    from fedbrats.simulate import simulate

    cfg = _load(args.config)
    fed, data = {}, {}
    if args.sites is not None:
        fed["sites"] = args.sites
        fed["min_sites"] = min(cfg.federation.min_sites, args.sites)
    if args.rounds is not None:
        fed["rounds"] = args.rounds
    if args.data is not None:
        data["root"] = str(Path(args.data).expanduser().resolve())
    if fed or data:
        cfg = with_overrides(cfg, federation=fed, data=data)
    return simulate(cfg, Path(args.out))


def cmd_predict(args) -> int:
    from node.predict import predict_case

    out = predict_case(Path(args.model), Path(args.case), Path(args.out), device=args.device)
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
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--cases-per-site", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--labels", choices=["2021", "2023"], default="2021",
                   help="label convention and file naming (default 2021 / FeTS 2022)")
    s.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm")
    s.set_defaults(func=cmd_data_synth)

    a = sub.add_parser("aggregator", help="run the aggregator daemon")
    a.add_argument("--config", required=True, help="aggregator TOML")
    a.set_defaults(func=cmd_aggregator)

    n = sub.add_parser("node", help="run a site node daemon")
    n.add_argument("--config", required=True, help="site TOML")
    n.set_defaults(func=cmd_node)

    sim = sub.add_parser("simulate", help="run a whole federation on 127.0.0.1 (real daemons)")
    sim.add_argument("--config", help="federation TOML (default: the embedded demo config)")
    sim.add_argument("--out", required=True, help="output folder")
    sim.add_argument("--sites", type=int, help="override federation.sites")
    sim.add_argument("--rounds", type=int, help="override federation.rounds")
    sim.add_argument("--data", help="BraTS/FeTS dataset folder (default: synthetic data)")
    sim.set_defaults(func=cmd_simulate)

    p = sub.add_parser("predict", help="segment one case with a trained model")
    p.add_argument("--model", required=True, help="model file (final_model.pt)")
    p.add_argument("--case", required=True, help="case folder with the four modalities")
    p.add_argument("--out", required=True, help="output segmentation .nii.gz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
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
