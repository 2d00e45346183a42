"""The attacks of experiments.attacks on tiny cases whose answer is known."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from experiments import attacks as atk


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one torch thread is fastest and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- update inversion -------------------------------------------------------------------------


def test_single_sample_update_of_a_linear_layer_inverts_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(20, 5).double()
    x = torch.randn(1, 20, dtype=torch.float64)
    target = torch.randn(1, 5, dtype=torch.float64)
    loss = ((torch.tanh(layer(x)) - target) ** 2).sum()
    gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
    rec = atk.invert_linear_update(gw.numpy(), gb.numpy())
    np.testing.assert_allclose(rec, x[0].numpy(), rtol=1e-10, atol=1e-12)
    # An update -lr * g (any learning rate, any sign) reveals the same input.
    rec2 = atk.invert_linear_update(-0.37 * gw.numpy(), -0.37 * gb.numpy())
    np.testing.assert_allclose(rec2, x[0].numpy(), rtol=1e-10, atol=1e-12)


def test_patch_mlp_update_reveals_the_patch_through_its_first_layer():
    torch.manual_seed(1)
    model = atk.PatchMLP(in_channels=2, size=(6, 6), hidden=8, out_channels=1)
    x = torch.randn(1, 2, 6, 6)
    y = (torch.rand(1, 1, 6, 6) > 0.5).float()
    upd = atk.compute_update(model, x, y, lr=0.1)
    rec = atk.invert_linear_update(upd[0], upd[1]).reshape(2, 6, 6)
    np.testing.assert_allclose(rec, x[0].numpy(), rtol=1e-4, atol=1e-5)
    assert atk.ssim(rec, x[0].numpy()) > 0.999


def test_invert_linear_update_refuses_a_zero_bias_gradient():
    with pytest.raises(ValueError, match="zero"):
        atk.invert_linear_update(np.zeros((3, 4)), np.zeros(3))


def test_gradient_matching_on_a_tiny_conv_net_recovers_a_simple_patch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Sigmoid(), nn.Conv2d(16, 1, 1))
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 3:7] = 1.0
    y = (x > 0.5).float()
    upd = atk.compute_update(net, x, y)
    before = [p.detach().clone() for p in net.parameters()]
    xh, ph, loss = atk.gradient_matching(net, upd, x_shape=(1, 8, 8), y_shape=(1, 8, 8), steps=300,
                                         labels=y.numpy(), bounds=(0.0, 1.0))
    assert atk.ssim(xh[0], x[0].numpy()) > 0.8
    assert atk.dice(ph[0] > 0.5, y[0].numpy() > 0.5) == 1.0
    assert loss < 0.05
    # The attack does not modify the model.
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_gradient_matching_on_the_small_model_recovers_patch_and_unknown_mask():
    torch.manual_seed(0)
    model = atk.PatchMLP(in_channels=2, size=(10, 10), hidden=32, out_channels=1)
    xx, yy = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    blob = ((xx - 5) ** 2 + (yy - 4) ** 2 <= 9).astype(np.float32)
    x = torch.tensor(np.stack([blob * 2 - 0.5, 1.0 - blob])[None])
    y = torch.tensor(blob[None, None])
    upd = atk.compute_update(model, x, y)
    xh, ph, _ = atk.gradient_matching(model, upd, x_shape=(2, 10, 10), y_shape=(1, 10, 10),
                                      steps=200)
    assert atk.ssim(xh[0], x[0].numpy()) > 0.9
    assert atk.dice(ph[0, 0] > 0.5, blob > 0.5) > 0.9


def test_gradient_matching_on_noise_finds_nothing():
    torch.manual_seed(0)
    model = atk.PatchMLP(in_channels=1, size=(8, 8), hidden=16, out_channels=1)
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 2:6] = 1.0
    noise = [np.random.default_rng(0).normal(size=tuple(p.shape)) for p in model.parameters()]
    xh, _, _ = atk.gradient_matching(model, noise, x_shape=(1, 8, 8), y_shape=(1, 8, 8), steps=60)
    assert atk.ssim(xh[0], x[0].numpy()) < 0.3


def test_gradient_matching_rejects_a_mismatched_update():
    model = atk.PatchMLP(in_channels=1, size=(4, 4), hidden=4, out_channels=1)
    with pytest.raises(ValueError, match="does not match"):
        atk.gradient_matching(model, [np.zeros(3)], x_shape=(1, 4, 4), y_shape=(1, 4, 4), steps=1)


# --- image scores -----------------------------------------------------------------------------


def test_ssim_psnr_dice_reference_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 16, 16))
    assert atk.ssim(a, a) == pytest.approx(1.0)
    assert atk.psnr(a, a) == math.inf
    noisy = a + rng.normal(scale=0.5, size=a.shape)
    worse = a + rng.normal(scale=2.0, size=a.shape)
    assert 0 < atk.ssim(worse, a) < atk.ssim(noisy, a) < 1
    assert atk.psnr(worse, a) < atk.psnr(noisy, a)
    assert atk.ssim(rng.normal(size=(16, 16, 16)), rng.normal(size=(16, 16, 16)),
                    channel_axis=None) == pytest.approx(0.0, abs=0.05)
    m = np.zeros((4, 4), bool)
    m[:2] = True
    n = np.zeros((4, 4), bool)
    n[1:3] = True
    assert atk.dice(m, n) == pytest.approx(0.5)
    assert atk.dice(np.zeros(3), np.zeros(3)) == 1.0


# --- membership inference ---------------------------------------------------------------------


def test_mia_auc_is_one_on_a_perfectly_separable_case():
    scores = [5.0, 6.0, 7.0, 8.0, 0.0, 1.0, 2.0]
    labels = [1, 1, 1, 1, 0, 0, 0]
    res = atk.mia_summary(scores, labels)
    assert res["auc"] == 1.0
    assert res["tpr_at_fpr"] == 1.0
    assert res["ci_low"] == 1.0 and res["above_chance"]
    assert atk.roc_auc([-s for s in scores], labels) == 0.0


def test_mia_auc_is_one_half_on_identical_distributions():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    labels = np.r_[np.ones(500, int), np.zeros(500, int)]
    res = atk.mia_summary(scores, labels)
    assert abs(res["auc"] - 0.5) < 0.05
    assert res["ci_low"] < 0.5 < res["ci_high"]
    assert not res["above_chance"]
    assert res["tpr_at_fpr"] < 0.1
    # ties count one half
    assert atk.roc_auc([1.0, 1.0], [1, 0]) == 0.5


def test_roc_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = rng.integers(0, 2, size=40)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert atk.roc_auc(s, y) == pytest.approx(pairwise)


def test_tpr_at_low_fpr_counts_members_above_every_non_member():
    scores = [0.1, 0.2, 0.3, 0.9, 0.5, 0.6, 0.95]
    labels = [0, 0, 0, 0, 1, 1, 1]
    assert atk.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(1 / 3)
    assert atk.tpr_at_fpr(scores, labels, 0.25) == pytest.approx(1.0)


# --- property inference -----------------------------------------------------------------------


def test_property_inference_picks_the_site_with_the_largest_property():
    units = {"site-1": ("site-1",), "site-2": ("site-2",), "site-3": ("site-3",)}
    scores = {"site-1": 10.0, "site-2": 30.0, "site-3": 20.0}
    assert atk.property_accuracy(scores, units, "site-2") == 1.0
    assert atk.property_accuracy(scores, units, "site-1") == 0.0
    # Ties between units are broken uniformly.
    assert atk.property_accuracy({"site-1": 1.0, "site-2": 1.0, "site-3": 0.0}, units,
                                 "site-1") == 0.5


def test_property_inference_on_a_sum_is_a_guess():
    units = {"sum": ("site-1", "site-2", "site-3")}
    assert atk.property_accuracy({"sum": 4.2}, units, "site-2") == pytest.approx(1 / 3)
    # One colluder apart, the other two stay together.
    units = {"site-3": ("site-3",), "sum(site-1,site-2)": ("site-1", "site-2")}
    assert atk.property_accuracy({"site-3": 1.0, "sum(site-1,site-2)": 2.0}, units,
                                 "site-1") == 0.5
    assert atk.property_accuracy({}, units, "site-1") == pytest.approx(1 / 3)


# --- protections and collusion ----------------------------------------------------------------


def test_collusion_sum_minus_colluders_is_the_target_exactly():
    rng = np.random.default_rng(0)
    deltas = {s: rng.normal(size=50) for s in ("site-1", "site-2", "site-3")}
    weights = {"site-1": 6, "site-2": 4, "site-3": 5}
    total = sum(weights[s] * deltas[s] for s in deltas)
    W = sum(weights.values())
    target, w = atk.remove_colluders(total, W, {s: (weights[s], deltas[s]) for s in ("site-2", "site-3")})
    np.testing.assert_allclose(target, deltas["site-1"], rtol=1e-12, atol=1e-12)
    assert w == 6
    # One colluder: the weighted mean of the two honest sites.
    rest, w = atk.remove_colluders(total, W, {"site-3": (5, deltas["site-3"])})
    np.testing.assert_allclose(rest, (6 * deltas["site-1"] + 4 * deltas["site-2"]) / 10, atol=1e-12)
    with pytest.raises(ValueError, match="no honest site"):
        atk.remove_colluders(total, W, {s: (weights[s], deltas[s]) for s in deltas})


def test_dp_protections_clip_and_add_noise_of_the_configured_scale():
    rng = np.random.default_rng(0)
    g = np.full(10_000, 0.1)  # norm 10
    assert np.linalg.norm(atk.l2_clip(g, 1.0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(atk.l2_clip(g, 100.0), g)
    noisy = atk.site_gaussian(g, clip=1.0, sigma=2.0, rng=rng)
    assert np.std(noisy - atk.l2_clip(g, 1.0)) == pytest.approx(2.0, rel=0.03)
    share = atk.site_distributed_share(g, clip=1.0, sigma=2.0, shares=4, rng=rng)
    assert np.std(share - atk.l2_clip(g, 1.0)) == pytest.approx(1.0, rel=0.03)
    step = atk.dp_sgd_gradient([g, -g], clip=1.0, sigma=0.0, expected_batch=2, rng=rng)
    np.testing.assert_allclose(step, 0.0, atol=1e-12)
    step = atk.dp_sgd_gradient([g], clip=1.0, sigma=1.0, expected_batch=4, rng=rng)
    assert np.std(step - atk.l2_clip(g, 1.0) / 4) == pytest.approx(0.25, rel=0.03)


def test_flatten_and_unflatten_round_trip():
    parts = [np.arange(6.0).reshape(2, 3), np.array([7.0]), np.ones((2, 2, 2))]
    v = atk.flatten(parts)
    back = atk.unflatten(v, parts)
    for a, b in zip(parts, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        atk.unflatten(np.zeros(3), parts)
