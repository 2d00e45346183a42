"""The noise that site-level DP actually puts into the aggregate has the configured variance.

Each test pushes a *zero* update through the real path, so every coordinate of the unmasked sum
is one independent sample of the aggregate noise: 20k–60k coordinates per round give a relative
sampling error of the variance of sqrt(2/N) ≈ 0.6–1 %, so a 10 % tolerance can only pass for
the right σ (each test also shows that σ·1.1 and σ·0.9 would be rejected).

* ``site-local`` (:class:`node.dp.SiteLocalGaussian`): each site adds N(0, σ²C²) per coordinate,
  so one site's update has variance σ²C² and the plaintext sum of n sites nσ²C².
* ``site-distributed`` under ``mask``: real quantisation, real :class:`node.dp.SkellamNoiser`,
  real pairwise masks (:class:`node.secagg_client.MaskingClient`) and unmasking with centred
  decoding (:class:`aggregator.secagg.MaskedRound`).  Each site adds Skellam noise of variance
  σ²Δ₂²/min_sites in integer units (Agarwal, Kairouz, Liu, "The Skellam Mechanism for
  Differentially Private Federated Learning", NeurIPS 2021), Δ₂ = C·scale + √d (scale =
  (2^bits − 1)/(2·secagg.clip); √d bounds stochastic rounding), so a sum of min_sites shares
  carries σ²(C + √d/scale)² in weight units, plus the rounding variance n·step²/4.
* ``site-distributed`` under ``ckks`` (:class:`node.dp.SiteDistributedGaussian`): shares of
  N(0, σ²C²/min_sites); min_sites of them carry σ²C².

Then the same over real gRPC on 127.0.0.1 (port 0, mutual TLS) with the real node protocol loop
(:class:`node.daemon.SiteSession`, the daemon's own SkellamNoiser / CKKS encryption); only the
training is replaced by a zero update.  In process, the noise generators are seeded; the masks
and rounding seeds come from os.urandom inside the protocol, but masks cancel exactly and
rounding adds a variance ~1e-9 of the noise's, so the outcome is fixed.  Over gRPC the daemon
draws fresh os.urandom noise seeds (it offers no seed), so the measured ratio varies by its
sampling error (~0.7 %): a 10 % miss would be a 14-standard-error event.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from federation_harness import FixedWorker

from aggregator.aggregate import make_secure_sum
from aggregator.secagg import MaskedRound
from aggregator.server import AggregatorCore, run_server, server_credentials
from crypto import primitives
from fedbrats.config import (
    Config,
    DPConfig,
    FederationConfig,
    SecAggConfig,
    load_config,
    with_overrides,
)
from fedbrats.errors import FedbratsError, RoundAborted
from fedbrats.masking import graph_seed, quant_params
from fedbrats.provision import provision
from node.daemon import SiteSession, make_masking_client, open_channel
from node.dp import SiteLocalGaussian, SkellamNoiser, make_dp_filters, make_rng
from node.secagg_client import MaskingClient

TOL = 0.10  # the acceptance criterion: within 10 % of the configured variance


def _check_variance(samples: np.ndarray, expected: float, *, sigma_sq_c_sq: float | None = None) -> float:
    """Assert var(samples) is within TOL of ``expected`` and that a 10 % wrong σ would fail."""
    n = samples.size
    assert math.sqrt(2.0 / n) < 0.011  # sampling error of the variance ~1 %: the test can fail
    var = float(np.var(samples))
    ratio = var / expected
    assert abs(ratio - 1.0) < TOL, (var, expected)
    for wrong in (1.1, 0.9):  # a noise multiplier 10 % off would be detected
        assert abs(var / (wrong**2 * expected) - 1.0) > TOL
    assert abs(float(np.mean(samples))) < 5.0 * math.sqrt(expected / n)
    if sigma_sq_c_sq is not None:
        assert abs(var / sigma_sq_c_sq - 1.0) < TOL
    return ratio


# ---------------------------------------------------------------------------------------------
# site-local: plaintext aggregation


def test_site_local_noise_per_site_and_in_the_plaintext_sum():
    sigma, C, n, dim = 0.8, 0.5, 4, 25_000
    cfg = Config(federation=FederationConfig(secure_aggregation="none", sites=n, min_sites=n),
                 dp=DPConfig(mode=("site-local",), site_clip=C, site_noise_multiplier=sigma))
    sites = [f"site-{i}" for i in range(1, n + 1)]
    filters = {s: make_dp_filters(cfg, state_dir="", site=s, rng=make_rng(40 + i))
               for i, s in enumerate(sites)}
    assert all(isinstance(f[0], SiteLocalGaussian) and f[0].noise_std == pytest.approx(sigma * C)
               for f in filters.values())
    fedavg = make_secure_sum("none")
    zero = {"a": np.zeros(dim - 5000, np.float32), "b": np.zeros((50, 100), np.float32)}
    per_site, sums = [], []
    for r in (1, 2):
        fedavg.begin_round(r, zero)
        for s in sites:
            delta = zero
            for f in filters[s]:
                delta = f(r, delta)
            per_site.append(np.concatenate([v.ravel() for v in delta.values()]))
            fedavg.add(s, 1, delta)  # equal weights, as the daemon uses with site-level DP
        new = fedavg.finalize(tuple(sites))
        sums.append(n * np.concatenate([new[k].ravel().astype(np.float64) for k in zero]))
    # What one site releases: N(0, σ²C²) per coordinate (the site-local definition of σ).
    one = _check_variance(np.concatenate(per_site[:n]).astype(np.float64), sigma**2 * C**2)
    # The sum of n sites carries n σ²C² (so the FedAvg mean carries σ²C²/n).
    total = _check_variance(np.concatenate(sums), n * sigma**2 * C**2)
    print(f"site-local: var/(σ²C²) per site = {one:.5f}, var/(nσ²C²) of the sum = {total:.5f}")


# ---------------------------------------------------------------------------------------------
# site-distributed under mask: the real masking round in process


def _identities(sites):
    keys = {s: primitives.ed25519_keypair() for s in sites}
    return {s: k[0] for s, k in keys.items()}, {s: k[1] for s, k in keys.items()}


def _masked_round(cfg, clients, noisers, model, r, deltas, tamper=None):
    """One round of the real protocol (the stage order of SiteSession and the server)."""
    sites = sorted(clients)
    agg = MaskedRound(cfg, r, model)
    for s in sites:
        agg.add_advertisement(clients[s].advertise(r))
    agg.close_advertise(tuple(sites))
    for s in sites:
        adverts, neighbours = agg.keys_for(s)
        agg.add_shares(s, clients[s].make_shares(r, adverts, neighbours, agg.threshold,
                                                 graph_seed(cfg.federation.name, r)))
    agg.close_share(tuple(sites))
    for s in sites:
        clients[s].receive_shares(r, *agg.shares_for(s))
    for s in sites:
        masked, clipped = clients[s].mask(r, deltas[s], 1, noiser=noisers[s])
        assert clipped == 0
        agg.add_masked(s, masked)
    agg.close_masked(tuple(sites))
    survivors, dropped = agg.survivors()
    for s in sites:
        agg.add_revealed(s, clients[s].reveal(r, survivors, dropped))
    if tamper is not None:
        tamper(agg)
    mean, weight = agg.unmask()
    return agg, mean, weight


def _skellam_cfg(n, *, min_sites, sigma, C, clip, bits, max_weight):
    return Config(federation=FederationConfig(name="dp-noise", secure_aggregation="mask", sites=n,
                                              min_sites=min_sites),
                  secagg=SecAggConfig(threshold=2, clip=clip, bits=bits, modulus_bits=32,
                                      max_weight=max_weight),
                  dp=DPConfig(mode=("site-distributed",), site_clip=C, site_noise_multiplier=sigma))


def _expected_skellam_sum_variance(*, sigma, C, scale, dim, shares, min_sites):
    """Variance of the unmasked sum's noise, weight units², by the code's definition."""
    noise = sigma**2 * (C + math.sqrt(dim) / scale) ** 2 * shares / min_sites
    rounding = shares * 0.25 / scale**2  # a zero update sits half-way between two levels
    return noise + rounding


@pytest.mark.parametrize("bits,max_weight,modulus", [(16, 100, 64), (10, 1, 32)])
def test_site_distributed_skellam_through_real_masking_has_configured_variance(bits, max_weight, modulus):
    n, sigma, C, clip, dim, rounds = 3, 1.0, 0.5, 0.25, 30_000, 2
    cfg = _skellam_cfg(n, min_sites=n, sigma=sigma, C=C, clip=clip, bits=bits, max_weight=max_weight)
    params = quant_params(cfg, dim=dim)
    # The noise headroom decides the modulus: 16 value bits + 9 + 1 fit 2^32 but not with the
    # noise's ~21 bits (widened); 10 bits with weight 1 keep 2^32 even with the noise.
    assert params.modulus_bits == modulus and params.noise_headroom > 0
    sites = [f"site-{i}" for i in range(1, n + 1)]
    private, public = _identities(sites)
    clients = {s: MaskingClient(cfg, s, private[s], public) for s in sites}
    # As SiteSession._skellam builds it (min_sites shares carry σ), with seeded generators.
    noisers = {s: SkellamNoiser(C, sigma, cfg.federation.min_sites, clip=clip, bits=bits, dim=dim,
                                rng=make_rng(7 * i + bits)) for i, s in enumerate(sites)}
    filters = {s: make_dp_filters(cfg, state_dir="", site=s) for s in sites}  # SiteClip
    model = {"a": np.zeros(dim - 1000, np.float32), "b": np.zeros((10, 100), np.float32)}
    sums, negative = [], 0
    for r in range(1, rounds + 1):
        deltas = {}
        for s in sites:
            deltas[s] = {k: np.zeros_like(v) for k, v in model.items()}
            for f in filters[s]:
                deltas[s] = f(r, deltas[s])
        agg, mean, weight = _masked_round(cfg, clients, noisers, model, r, deltas)
        assert agg.params == params and weight == n  # both ends used the same parameters
        total = weight * np.concatenate([mean[k].ravel().astype(np.float64) for k in model])
        sums.append(total)
        # Coordinates whose noisy integer sum was negative wrapped modulo 2^m and were decoded
        # in the centred representative.
        negative += int(np.count_nonzero(total < -clip * weight))
    samples = np.concatenate(sums)
    scale = 1.0 / params.step
    expected = _expected_skellam_sum_variance(sigma=sigma, C=C, scale=scale, dim=dim, shares=n,
                                              min_sites=n)
    ratio = _check_variance(samples, expected)
    print(f"skellam bits={bits} modulus=2^{modulus}: var/expected = {ratio:.4f}, "
          f"var/(σ²C²) = {np.var(samples) / (sigma * C) ** 2:.4f}")
    assert negative > 0.03 * samples.size
    if bits == 16:
        # √d/scale is 0.3 % of C here: the sum carries σC (the site-distributed definition).
        assert abs(np.var(samples) / (sigma * C) ** 2 - 1.0) < TOL
    # Any coordinate's noise stays within the headroom B the budget reserved.
    assert np.abs(samples).max() * scale < params.noise_headroom


def test_skellam_noise_grows_with_more_shares_than_min_sites():
    # Calibrated for min_sites = 2 shares; all 3 sites take part: 3/2 of the noise variance.
    n, sigma, C, clip, bits, dim = 3, 1.0, 0.5, 0.25, 16, 30_000
    cfg = _skellam_cfg(n, min_sites=2, sigma=sigma, C=C, clip=clip, bits=bits, max_weight=1)
    params = quant_params(cfg, dim=dim)
    sites = [f"site-{i}" for i in range(1, n + 1)]
    private, public = _identities(sites)
    clients = {s: MaskingClient(cfg, s, private[s], public) for s in sites}
    noisers = {s: SkellamNoiser(C, sigma, 2, clip=clip, bits=bits, dim=dim, rng=make_rng(90 + i))
               for i, s in enumerate(sites)}
    # The headroom covers the 3 shares that can be summed, not only the 2 it is calibrated for.
    assert params.noise_headroom == noisers["site-1"].headroom(sites=3) > noisers["site-1"].headroom()
    model = {"w": np.zeros(dim, np.float32)}
    sums = []
    for r in (1, 2):
        _, mean, weight = _masked_round(cfg, clients, noisers, model, r,
                                        {s: {"w": np.zeros(dim, np.float32)} for s in sites})
        sums.append(weight * mean["w"].astype(np.float64))
    expected = _expected_skellam_sum_variance(sigma=sigma, C=C, scale=1.0 / params.step, dim=dim,
                                              shares=3, min_sites=2)
    _check_variance(np.concatenate(sums), expected)


def test_masked_sum_outside_the_noise_headroom_is_refused():
    # A corrupted sum (half the modulus added to 10 coordinates of the running masked sum)
    # leaves [-B, W·L + B] there and is refused rather than decoded into a wrong mean.
    n, dim = 3, 1000
    cfg = _skellam_cfg(n, min_sites=n, sigma=1.0, C=0.5, clip=0.25, bits=16, max_weight=1)
    sites = [f"site-{i}" for i in range(1, n + 1)]
    private, public = _identities(sites)
    clients = {s: MaskingClient(cfg, s, private[s], public) for s in sites}
    noisers = {s: SkellamNoiser(0.5, 1.0, n, clip=0.25, bits=16, dim=dim, rng=make_rng(i))
               for i, s in enumerate(sites)}
    params = quant_params(cfg, dim=dim)

    def corrupt(agg):
        agg._sum[:10] += params.dtype.type(1 << (params.modulus_bits - 1))

    with pytest.raises(RoundAborted, match=f"10 of {dim} coordinates of the noisy sum lie outside "
                                           f".*headroom B = {params.noise_headroom}"):
        _masked_round(cfg, clients, noisers, {"w": np.zeros(dim, np.float32)}, 1,
                      {s: {"w": np.zeros(dim, np.float32)} for s in sites}, tamper=corrupt)


# ---------------------------------------------------------------------------------------------
# Real gRPC on 127.0.0.1


FED = "dp-noise-fed"
GRPC_SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpnoise") / "federation"
    provision(out, federation=FED, sites=GRPC_SITES, aggregator="127.0.0.1:0", localhost=True)
    return out


def _federate(kits, tmp_path, model, *, mode, dp, rounds, secagg=None, ckks=None):
    """The federation harness with a large zero-update model (real server and SiteSessions)."""
    over = dict(federation={"name": FED, "sites": len(GRPC_SITES), "min_sites": len(GRPC_SITES),
                            "rounds": rounds, "secure_aggregation": mode},
                secagg={"threshold": 2, "stage_timeout_s": 30.0, **(secagg or {})},
                ckks=dict(ckks or {}), dp=dp, training={"local_steps": 1})
    agg_cfg = with_overrides(load_config(kits / "aggregator" / "aggregator.toml"),
                             aggregator={"out_dir": str(tmp_path), "round_timeout_s": 60.0,
                                         "metrics_timeout_s": 30.0}, **over)
    core = AggregatorCore(agg_cfg, model, save_model=lambda p, t, r: None)
    workers = {s: FixedWorker({k: np.zeros_like(v) for k, v in model.items()}, 10) for s in GRPC_SITES}
    codes, errors = {}, {}
    with run_server(core, "127.0.0.1", 0, credentials=server_credentials(agg_cfg)) as port:
        def site_main(site):
            cfg = load_config(kits / site / f"{site}.toml")
            cfg = with_overrides(cfg, node={"aggregator": f"127.0.0.1:{port}",
                                            "state_dir": str(tmp_path / site)}, **over)
            try:
                session = SiteSession(cfg, workers[site],
                                      make_masking_client(cfg) if mode == "mask" else None)
                with open_channel(cfg) as ch:
                    codes[site] = session.run(ch)
            except Exception as exc:  # reported by the test
                errors[site] = exc

        threads = [threading.Thread(target=site_main, args=(s,)) for s in GRPC_SITES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
    assert errors == {} and set(codes.values()) == {0}, (errors, codes)
    return core, workers


def _round_sums(workers, model, rounds):
    """The unmasked/decrypted sum of each round: n × (global_r − global_{r−1}), equal weights."""
    res = workers[GRPC_SITES[0]].results
    n = len(GRPC_SITES)
    before = model
    out = []
    for r in range(1, rounds + 1):
        after = res[r]
        for s in GRPC_SITES[1:]:  # every site received the same result
            assert all(np.array_equal(workers[s].results[r][k], after[k]) for k in model)
        out.append(n * np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in model]))
        before = {k: after[k].astype(np.float64) for k in model}
    return np.concatenate(out)


def test_grpc_site_distributed_skellam_round_has_configured_variance(kits, tmp_path):
    sigma, C, clip, bits, dim, rounds = 1.0, 0.5, 0.25, 16, 20_000, 2
    model = {"a": np.zeros(dim - 400, np.float32), "b": np.zeros((20, 20), np.float32)}
    dp = {"mode": ["site-distributed"], "site_clip": C, "site_noise_multiplier": sigma}
    core, workers = _federate(kits, tmp_path, model, mode="mask", dp=dp, rounds=rounds,
                              secagg={"clip": clip, "bits": bits, "modulus_bits": 32})
    params = quant_params(core.cfg, dim=dim)
    assert params.modulus_bits == 64 and params.noise_headroom > 0  # widened for the noise
    samples = _round_sums(workers, model, rounds)
    expected = _expected_skellam_sum_variance(sigma=sigma, C=C, scale=1.0 / params.step, dim=dim,
                                              shares=len(GRPC_SITES), min_sites=len(GRPC_SITES))
    ratio = _check_variance(samples, expected, sigma_sq_c_sq=sigma**2 * C**2)
    print(f"grpc skellam: var/expected = {ratio:.4f}, var/(σ²C²) = {np.var(samples) / (sigma * C) ** 2:.4f}")
    assert np.count_nonzero(samples < -clip * len(GRPC_SITES)) > 0.03 * samples.size  # wrapped


def test_grpc_site_distributed_ckks_gaussian_shares_have_configured_variance(kits, tmp_path):
    sigma, C, dim, rounds = 1.0, 0.5, 20_000, 2
    model = {"w": np.zeros(dim, np.float32)}
    dp = {"mode": ["site-distributed"], "site_clip": C, "site_noise_multiplier": sigma}
    # ckks.max_abs_value far above a share's σC/√n = 0.29 so that no noise value is clipped.
    core, workers = _federate(kits, tmp_path, model, mode="ckks", dp=dp, rounds=rounds,
                              ckks={"max_abs_value": 4.0})
    samples = _round_sums(workers, model, rounds)
    ratio = _check_variance(samples, sigma**2 * C**2, sigma_sq_c_sq=sigma**2 * C**2)
    print(f"grpc ckks: var/(σ²C²) = {ratio:.4f}")


def test_masking_without_the_skellam_noiser_is_refused_under_site_distributed():
    cfg = _skellam_cfg(3, min_sites=3, sigma=1.0, C=0.5, clip=0.25, bits=10, max_weight=1)
    sites = ["site-1", "site-2", "site-3"]
    private, public = _identities(sites)
    clients = {s: MaskingClient(cfg, s, private[s], public) for s in sites}
    model = {"a": np.zeros(100, np.float32)}
    with pytest.raises(FedbratsError, match="no Skellam noiser was given: refusing to mask"):
        _masked_round(cfg, clients, {s: None for s in sites}, model, 1,
                      {s: {"a": np.zeros(100, np.float32)} for s in sites})
