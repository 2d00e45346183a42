"""Secure aggregation by pairwise masking over real gRPC on 127.0.0.1 (port 0), with mutual TLS.

Five sites run the real node protocol loop (:class:`node.daemon.SiteSession` with the real
:class:`node.secagg_client.MaskingClient`, provisioned identity keys, real crypto); only the
local training is replaced by fixed updates, so the unmasked sum can be compared with the
plaintext sum exactly.  Cases K07 (drops at each stage, too many drops) and K08 (bit budget),
and what the aggregator actually sees.
"""

import numpy as np
import pytest
from federation_harness import SHAPES, federate, model
from scipy import stats

from crypto.quantize import QuantParams, check_budget
from fedbrats.config import load_config, with_overrides
from fedbrats.errors import ConfigError
from fedbrats.masking import MASKED_TENSOR, quant_params
from fedbrats.provision import provision

FED = "secagg-fed"
SITES = [f"site-{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg") / "federation"
    provision(out, federation=FED, sites=SITES, aggregator="127.0.0.1:0", localhost=True)
    return out


def _federate(kits, tmp_path, **kw):
    return federate(kits, tmp_path, SITES, fed_name=FED, **kw)


def _expected(deltas, weights, sites, clip=0.25):
    w = sum(weights[s] for s in sites)
    return {k: model()[k] + sum(weights[s] * np.clip(deltas[s][k], -clip, clip) for s in sites) / w
            for k in SHAPES}


def _check_result(core, workers, expected, sites):
    step = quant_params(core.cfg).step
    for s in sites:
        got = workers[s].results[1]
        for k in SHAPES:
            # Within one quantisation step per coordinate (stochastic rounding of a weighted mean).
            np.testing.assert_allclose(got[k], expected[k], atol=step * 1.01 + 1e-6)


def test_all_sites_present_sum_equals_plaintext_fedavg(kits, tmp_path):
    core, workers, deltas, weights, codes, errors = _federate(kits, tmp_path)
    assert errors == {} and set(codes.values()) == {0}
    assert not core.state.failed
    _check_result(core, workers, _expected(deltas, weights, SITES), SITES)


def test_k07a_site_drops_after_masked_input_before_unmask(kits, tmp_path):
    core, workers, deltas, weights, codes, errors = _federate(kits, tmp_path,
                                                              drops={"site-3": "unmask"})
    assert errors == {} and not core.state.failed
    # site-3's input is in the sum: it is a survivor whose self mask is rebuilt from shares.
    alive = [s for s in SITES if s != "site-3"]
    _check_result(core, workers, _expected(deltas, weights, SITES), alive)


def test_k07b_site_drops_after_sharing_keys_before_masked_input(kits, tmp_path):
    core, workers, deltas, weights, codes, errors = _federate(kits, tmp_path,
                                                              drops={"site-5": "masked_input"})
    assert errors == {} and not core.state.failed
    four = SITES[:4]
    # The sum covers the four others; site-5's dangling pairwise masks were removed.
    _check_result(core, workers, _expected(deltas, weights, four), four)


def test_k07c_too_many_drops_aborts_and_releases_nothing(kits, tmp_path):
    core, workers, deltas, weights, codes, errors = _federate(
        kits, tmp_path, drops={"site-1": "unmask", "site-2": "unmask", "site-3": "unmask"})
    assert errors == {}
    st = core.state
    assert st.failed
    assert "only 2 of the 3 needed unmask share set(s) arrived" in st.message
    assert st.completed_round == 0
    assert all(not w.results for w in workers.values())  # no result was released
    assert codes["site-4"] == codes["site-5"] == 6  # RoundAborted


def test_k08_bit_budget_widens_or_refuses_and_mean_within_n_steps(kits, tmp_path):
    k08 = QuantParams(clip=1.0, bits=24, modulus_bits=32, max_sites=16, max_weight=400)
    assert check_budget(k08).modulus_bits == 64
    with pytest.raises(ConfigError, match="38 bits needed"):
        check_budget(k08, widen=False)
    with pytest.raises(ConfigError, match="bit budget"):
        with_overrides(load_config(kits / "aggregator" / "aggregator.toml"),
                       federation={"secure_aggregation": "mask", "sites": 16},
                       secagg={"bits": 48, "max_weight": 100_000})
    # Over gRPC: weights up to 400, 24-bit values, modulus 32 configured -> widened to 64;
    # one site's update reaches 3.0 and is clipped to 1.0.
    rng = np.random.default_rng(3)
    deltas = {s: {k: rng.uniform(-0.9, 0.9, v).astype(np.float32) for k, v in SHAPES.items()}
              for s in SITES}
    deltas["site-2"]["conv.bias"][:3] = 3.0
    weights = {s: w for s, w in zip(SITES, (400, 1, 250, 37, 399))}
    secagg = {"clip": 1.0, "bits": 24, "modulus_bits": 32, "max_weight": 400}
    record = []
    core, workers, _, _, codes, errors = _federate(kits, tmp_path, deltas=deltas, weights=weights,
                                                   secagg=secagg, record=record)
    assert errors == {} and not core.state.failed
    assert quant_params(core.cfg).modulus_bits == 64
    masked = [m for _, stage, m in record if stage == "masked_input"]
    assert masked and all(m[MASKED_TENSOR].dtype == np.uint64 for m in masked)
    step = quant_params(core.cfg).step
    exp = _expected(deltas, weights, SITES, clip=1.0)
    for k in SHAPES:
        err = np.abs(workers["site-1"].results[1][k] - exp[k])
        assert err.max() <= len(SITES) * step  # the case's bound: n · Δ
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json

    clipped = {json.loads(x)["site"]: json.loads(x)["clipped_values"] for x in lines}
    assert clipped["site-2"] == 3 and clipped["site-1"] == 0


def test_aggregator_sees_only_uniform_masked_vectors(kits, tmp_path):
    record = []
    core, workers, deltas, weights, codes, errors = _federate(kits, tmp_path, record=record)
    assert errors == {}
    seen = {site: msg[MASKED_TENSOR] for site, stage, msg in record if stage == "masked_input"}
    assert sorted(seen) == SITES
    bits = quant_params(core.cfg).modulus_bits
    for site, y in seen.items():
        flat = np.concatenate([deltas[site][k].reshape(-1) for k in SHAPES])
        # Uniform: the top 4 bits of each masked word spread evenly over 16 bins.
        top = (y[:-1] >> np.uint64(bits - 4)).astype(np.int64)
        _, p_uniform = stats.chisquare(np.bincount(top, minlength=16))
        assert p_uniform > 1e-4, (site, p_uniform)
        # Uncorrelated with the site's update (|r| small for ~150 coordinates).
        r = np.corrcoef(y[:-1].astype(np.float64), flat.astype(np.float64))[0, 1]
        assert abs(r) < 0.35, (site, r)
        # The weight coordinate is masked too: it is not the site's weight.
        assert int(y[-1]) != weights[site]
    # Nothing else the aggregator received carries plaintext: key material is public keys,
    # share bundles are AES-GCM ciphertexts, and revealed shares are of the allowed kind only.
    kinds = {(shr.owner, shr.kind) for _, stage, msg in record if stage == "unmask" for shr in msg}
    owners_by_kind = {}
    for owner, kind in kinds:
        owners_by_kind.setdefault(owner, set()).add(kind)
    assert all(len(k) == 1 for k in owners_by_kind.values())  # never both kinds for one site


def test_k10_site_refusing_to_mask_withdraws_and_its_masks_are_removed(kits, tmp_path):
    import json

    rng = np.random.default_rng(11)
    deltas = {s: {k: rng.uniform(-0.2, 0.2, v).astype(np.float32) for k, v in SHAPES.items()}
              for s in SITES}
    deltas["site-4"][next(iter(SHAPES))].flat[1] = np.inf
    core, workers, deltas, weights, codes, errors = _federate(kits, tmp_path, deltas=deltas)
    assert set(errors) == {"site-4"} and "non-finite" in str(errors["site-4"])
    assert not core.state.failed
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    withdrew = [e for e in events if e["event"] == "site_withdrew"]
    assert [(e["site"], e["stage"]) for e in withdrew] == [("site-4", "masked_input")]
    others = [s for s in SITES if s != "site-4"]
    # site-4 shared keys, then withdrew: the sum covers the others, its pairwise masks removed.
    _check_result(core, workers, _expected(deltas, weights, others), others)
