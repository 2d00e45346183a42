"""A real aggregator gRPC server and real node protocol loops (SiteSession) in threads.

Only the local training is replaced: :class:`FixedWorker` returns a known update, so what the
aggregator computes can be compared with plaintext FedAvg exactly.  Shared by the secure
aggregation tests (mask and ckks modes).
"""

import threading

import numpy as np

from aggregator.server import AggregatorCore, run_server, server_credentials
from fedbrats.config import load_config, with_overrides
from node.daemon import LocalUpdate, SiteSession, make_masking_client, open_channel

SHAPES = {"conv.weight": (8, 4, 3), "conv.bias": (8,), "norm.weight": (8,)}


def model(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


class FixedWorker:
    """Local work with a known update: Δ and weight fixed per site."""

    device = "cpu"
    num_val = 1

    def __init__(self, delta, weight):
        self.delta, self.num_train = delta, weight
        self.results = {}

    def train(self, round, global_model):
        return LocalUpdate({k: self.delta[k].copy() for k in global_model}, self.num_train, 1,
                           0.5, 0.0)

    def evaluate(self, round, global_model):
        self.results[round] = {k: v.copy() for k, v in global_model.items()}
        return {"wt": 1.0, "tc": 1.0, "et": 1.0, "mean": 1.0}


def federate(kits, tmp_path, sites, *, fed_name, mode="mask", drops=None, deltas=None,
             weights=None, secagg=None, ckks=None, rounds=1, record=None, site_ckks=None):
    """Run one federation: real server and one SiteSession per site in threads.

    Returns:
        ``(core, workers, deltas, weights, exit codes, exceptions)`` by site.
    """
    SITES = sites
    FED = fed_name
    drops = drops or {}
    agg_cfg = load_config(kits / "aggregator" / "aggregator.toml")
    over = dict(federation={"name": FED, "sites": len(SITES), "min_sites": 2, "rounds": rounds,
                            "secure_aggregation": mode},
                secagg={"threshold": 3, "stage_timeout_s": 3.0, **(secagg or {})},
                ckks=dict(ckks or {}), training={"local_steps": 1})
    agg_cfg = with_overrides(agg_cfg, aggregator={"out_dir": str(tmp_path), "round_timeout_s": 6.0,
                                                  "metrics_timeout_s": 5.0}, **over)
    rng = np.random.default_rng(7)
    deltas = deltas or {s: {k: rng.uniform(-0.2, 0.2, v).astype(np.float32)
                            for k, v in SHAPES.items()} for s in SITES}
    weights = weights or {s: 10 * (i + 1) for i, s in enumerate(SITES)}
    core = AggregatorCore(agg_cfg, model(),
                          save_model=lambda p, t, r: np.savez(p.with_suffix(".npz"), **t))
    if record is not None:
        core.on_receive = lambda site, stage, msg: record.append((site, stage, msg))
    workers, codes, errors = {}, {}, {}
    with run_server(core, "127.0.0.1", 0, credentials=server_credentials(agg_cfg)) as port:
        def site_main(site):
            cfg = load_config(kits / site / f"{site}.toml")
            site_over = dict(over)
            if site_ckks and site in site_ckks:
                site_over["ckks"] = {**over["ckks"], **site_ckks[site]}
            cfg = with_overrides(cfg, node={"aggregator": f"127.0.0.1:{port}",
                                            "drop_at": drops.get(site, "")}, **site_over)
            masking = make_masking_client(cfg) if mode == "mask" else None
            try:
                session = SiteSession(cfg, workers[site], masking)
            except Exception as exc:  # reported by the test
                errors[site] = exc
                return
            try:
                with open_channel(cfg) as ch:
                    codes[site] = session.run(ch)
            except Exception as exc:  # reported by the test
                errors[site] = exc

        for s in SITES:
            workers[s] = FixedWorker(deltas[s], weights[s])
        threads = [threading.Thread(target=site_main, args=(s,)) for s in SITES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    return core, workers, deltas, weights, codes, errors


