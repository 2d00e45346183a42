"""node.accounting: known answers, cross-checks against Google's dp_accounting, ledgers, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from fedbrats.errors import FedbratsError
from node.accounting import (
    DEFAULT_ORDERS,
    PURE_STATE_FILE,
    SAMPLE_STATE_FILE,
    SITE_STATE_FILE,
    AccountantStateError,
    PrivacyBudgetExceeded,
    PureDPAccountant,
    SampleLevelAccountant,
    SiteLevelAccountant,
    format_report,
    gaussian_rdp,
    load_accountant,
    privacy_report,
    rdp_to_epsilon,
    skellam_rdp,
    subsampled_gaussian_rdp,
)

INTEGER_ORDERS = tuple(range(2, 257))


def _google_epsilon(sigma: float, q: float, steps: int, delta: float, orders) -> float:
    acc = RdpAccountant(orders=list(orders))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# Known answers


def test_known_answer_opacus_rdp():
    """σ=1.5, q=0.04, 2250 steps, δ=1e-5: the published ε ≈ 7.329 (Opacus default orders)."""
    acc = SampleLevelAccountant("rdp", delta=1e-5)
    acc.step(1.5, 0.04, 2250)
    eps = acc.epsilon()
    assert eps == pytest.approx(7.329, abs=5e-4)
    assert eps == pytest.approx(7.3291111714, rel=1e-9)  # what Opacus 1.6 prints
    # Google's dp_accounting at the same orders: same figure at the printed precision; its RDP
    # at fractional orders is an upper bound of Opacus' (see node.accounting's docstring).
    google = _google_epsilon(1.5, 0.04, 2250, 1e-5, DEFAULT_ORDERS)
    assert google == pytest.approx(7.329, abs=5e-4)
    assert eps <= google < eps * (1 + 1e-4)


def test_gaussian_rdp_is_exact():
    orders = [1.5, 2, 10, 63]
    assert np.allclose(gaussian_rdp(2.0, orders), np.array(orders) / 8.0, rtol=0, atol=0)
    assert np.array_equal(subsampled_gaussian_rdp(2.0, 1.0, 3, orders), 3 * np.array(orders) / 8.0)
    with pytest.raises(FedbratsError, match="noise_multiplier"):
        gaussian_rdp(0.0)
    with pytest.raises(FedbratsError, match="sample_rate"):
        subsampled_gaussian_rdp(1.0, 1.5)


# ---------------------------------------------------------------------------------------------
# Site level vs dp_accounting


@pytest.mark.parametrize(
    "sigma,q,rounds,orders",
    [
        (1.0, 1.0, 10, DEFAULT_ORDERS),  # full participation: α/(2σ²), fractional orders too
        (0.8, 0.3, 50, INTEGER_ORDERS),  # site sampling: compare at integer orders (exact series)
        (2.0, 0.05, 1000, INTEGER_ORDERS),
    ],
)
def test_site_level_matches_dp_accounting(sigma, q, rounds, orders):
    ours = SiteLevelAccountant(orders=orders, delta=1e-5)
    for _ in range(rounds):
        ours.step(sigma, q)
    assert ours.releases == rounds and ours.history == [(sigma, q, rounds)]
    google = RdpAccountant(orders=list(orders))
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
    # same RDP curve ...
    assert np.allclose(ours.rdp(), google._rdp, rtol=1e-6, atol=0)
    # ... and the same conversion to (ε, δ)
    eps_g, order_g = google.get_epsilon_and_optimal_order(1e-5)
    eps, order = rdp_to_epsilon(orders, ours.rdp(), 1e-5)
    assert eps == pytest.approx(eps_g, rel=1e-6)
    assert order == order_g
    assert ours.epsilon() == pytest.approx(eps_g, rel=1e-6)


def test_site_level_would_be_and_persistence(tmp_path):
    acc = SiteLevelAccountant(site="site-2", delta=1e-5)
    acc.step(1.0)
    would = acc.would_be_epsilon(1)
    acc.step(1.0)
    assert acc.epsilon() == pytest.approx(would, rel=1e-12)
    acc.step_skellam(1000.0, 1000.0 * 30, 5e5)
    path = tmp_path / SITE_STATE_FILE
    acc.save(path)
    back = SiteLevelAccountant()
    back.load(path)
    assert back.site == "site-2" and back.delta == 1e-5
    assert back.history == acc.history and back.skellam_history == acc.skellam_history
    assert back.epsilon() == pytest.approx(acc.epsilon(), rel=1e-12)


def test_skellam_rdp_bounds_gaussian():
    orders = np.array(DEFAULT_ORDERS)
    l2, mu = 1000.0, 1e6  # Gaussian equivalent σ² = 2μ/Δ₂² = 2
    rdp = skellam_rdp(orders, l2_sensitivity=l2, l1_sensitivity=l2 * 30, mu=mu)
    gauss = orders / (2 * 2.0)
    assert np.all(rdp >= gauss) and np.allclose(rdp, gauss, rtol=1e-3)
    # coarse lattice: the correction term matters and is still finite
    coarse = skellam_rdp(orders, l2_sensitivity=1.0, l1_sensitivity=10.0, mu=1.0)
    assert np.all(coarse > orders / 4.0) and np.all(np.isfinite(coarse))


# ---------------------------------------------------------------------------------------------
# Sample level ledger


def test_sample_accountant_merges_history_and_would_be():
    acc = SampleLevelAccountant(delta=1e-5)
    assert acc.epsilon() == 0.0 and acc.steps == 0
    with pytest.raises(FedbratsError, match="give noise_multiplier"):
        acc.would_be_epsilon(10)
    would = acc.would_be_epsilon(100, noise_multiplier=1.0, sample_rate=0.01)
    for _ in range(100):
        acc.step(1.0, 0.01)
    assert acc.history == [(1.0, 0.01, 100)] and len(acc) == 100
    assert acc.epsilon() == pytest.approx(would, rel=1e-12)
    acc.step(2.0, 0.01, 5)
    assert acc.history == [(1.0, 0.01, 100), (2.0, 0.01, 5)]
    assert acc.would_be_epsilon(0) == pytest.approx(acc.epsilon(), rel=1e-12)


def test_prv_accountant_is_tighter_than_rdp():
    rdp = SampleLevelAccountant("rdp", delta=1e-5)
    prv = SampleLevelAccountant("prv", delta=1e-5)
    for acc in (rdp, prv):
        acc.step(1.0, 0.01, 1000)
    assert 0 < prv.epsilon() < rdp.epsilon()
    with pytest.raises(FedbratsError, match="dp.accountant"):
        SampleLevelAccountant("gdp")


def test_ledger_round_trip_and_atomic_write(tmp_path):
    acc = SampleLevelAccountant("rdp", site="site-1", delta=1e-5, budget=8.0, params={"max_grad_norm": 1.0})
    acc.step(1.1, 0.25, 30)
    acc.record_round(1, steps=30, epsilon=acc.epsilon())
    path = tmp_path / "sub" / SAMPLE_STATE_FILE
    acc.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [SAMPLE_STATE_FILE]  # no temp files left
    raw = json.loads(path.read_text())
    assert raw["format"] == "fedbrats-dp-accountant/1" and raw["kind"] == "sample-level"
    assert raw["history"] == [[1.1, 0.25, 30]]
    back = load_accountant(path)
    assert isinstance(back, SampleLevelAccountant)
    assert back.history == acc.history and back.rounds == acc.rounds and back.budget == 8.0
    assert back.epsilon() == pytest.approx(acc.epsilon(), rel=1e-12)


def test_damaged_ledger_is_refused_not_reset(tmp_path):
    path = tmp_path / SAMPLE_STATE_FILE
    path.write_text("{not json")
    with pytest.raises(AccountantStateError, match="unreadable"):
        SampleLevelAccountant().load(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(AccountantStateError, match="format"):
        SampleLevelAccountant().load(path)
    acc = SiteLevelAccountant()
    acc.step(1.0)
    acc.save(path)
    with pytest.raises(AccountantStateError, match="site-level"):
        SampleLevelAccountant().load(path)
    good = SampleLevelAccountant()
    good.step(1.0, 0.1, 3)
    state = good.state_dict()
    state["history"] = [[1.0, 1.5, 3]]
    path.write_text(json.dumps(state))
    with pytest.raises(AccountantStateError, match="sample_rate"):
        SampleLevelAccountant().load(path)
    with pytest.raises(FileNotFoundError):
        SampleLevelAccountant().load(tmp_path / "missing.json")


def test_pure_dp_sums():
    acc = PureDPAccountant(site="s", budget=2.5)
    for r in range(1, 4):
        acc.step(0.5, round=r)
    assert acc.epsilon() == pytest.approx(1.5)
    assert acc.would_be_epsilon(0.5) == pytest.approx(2.0)
    assert [r["epsilon_total"] for r in acc.rounds] == pytest.approx([0.5, 1.0, 1.5])


def test_budget_error_message():
    err = PrivacyBudgetExceeded(site="site-3", round=7, spent=4.2, would_be=5.1, budget=5.0, delta=1e-5)
    text = str(err)
    for part in ("site-3", "round 7", "4.2000", "5.1000", "5", "1e-05"):
        assert part in text
    assert isinstance(err, FedbratsError) and err.would_be == 5.1


# ---------------------------------------------------------------------------------------------
# Report


def test_privacy_report_and_format(tmp_path):
    sample = SampleLevelAccountant("rdp", site="site-1", delta=1e-5, budget=50.0,
                                   params={"max_grad_norm": 1.0, "batch_size": 2})
    sample.step(1.0, 0.25, 60)
    sample.record_round(2, steps=30)
    sample.save(tmp_path / SAMPLE_STATE_FILE)
    site = SiteLevelAccountant(site="site-1", delta=1e-5, params={"site_clip": 1.0})
    site.step(1.0, rounds=2)
    site.save(tmp_path / SITE_STATE_FILE)
    pure = PureDPAccountant(site="site-1")
    pure.step(0.1, round=1)
    pure.save(tmp_path / PURE_STATE_FILE)

    report = privacy_report(tmp_path)
    assert report["site"] == "site-1"
    kinds = {g["kind"]: g for g in report["guarantees"]}
    assert set(kinds) == {"sample-level", "site-level", "pure-dp"}
    s = kinds["sample-level"]
    assert s["epsilon"] == pytest.approx(sample.epsilon()) and s["delta"] == 1e-5
    assert s["budget"] == 50.0 and s["budget_left"] == pytest.approx(50.0 - sample.epsilon())
    assert s["steps"] == 60
    assert kinds["site-level"]["budget"] is None and kinds["site-level"]["releases"] == 2
    assert kinds["pure-dp"]["epsilon"] == pytest.approx(0.1)

    text = format_report(report)
    assert "site site-1" in text and "sample-level" in text and "site-level" in text
    assert f"{sample.epsilon():.4g}" in text and "left" in text and "max_grad_norm=1" in text
    json.dumps(report)  # serialisable for --json output

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no privacy ledger" in format_report(privacy_report(empty))
    # a simulation's OUT folder: the report points at the site folders below it
    for site in ("site-1", "site-2"):
        (tmp_path / "out" / "sites" / site).mkdir(parents=True)
        SampleLevelAccountant(site=site, delta=1e-5).save(tmp_path / "out" / "sites" / site / SAMPLE_STATE_FILE)
    text = format_report(privacy_report(tmp_path / "out"))
    assert "no privacy ledger in this folder" in text
    assert str(tmp_path / "out" / "sites" / "site-1") in text and str(tmp_path / "out" / "sites" / "site-2") in text
    with pytest.raises(FedbratsError, match="not a directory"):
        privacy_report(tmp_path / "nope")


def test_rdp_to_epsilon_edge_cases():
    assert rdp_to_epsilon([2, 3], [0.0, 0.0], 1e-5)[0] == 0.0
    assert math.isinf(rdp_to_epsilon([2, 3], [math.inf, math.inf], 1e-5)[0])
    with pytest.raises(FedbratsError, match="delta"):
        rdp_to_epsilon([2], [1.0], 1.5)
    with pytest.raises(FedbratsError, match="orders"):
        rdp_to_epsilon([2, 3], [1.0], 1e-5)
