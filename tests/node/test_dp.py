"""node.dp and LocalTrainer's DP-SGD path: K03 (Opacus on MONAI 3D nets), K04 (ε across rounds),
noise statistics of the site-level mechanisms, SVT and partial sharing.

Tiny models and 8³–16³ volumes made here; fixed seeds, so nothing can flake.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.networks.nets import SegResNet, UNet
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedbrats.config import Config, DPConfig, FederationConfig, NodeConfig, TrainingConfig
from fedbrats.errors import FedbratsError
from node import dp as node_dp
from node.accounting import SAMPLE_STATE_FILE, PrivacyBudgetExceeded, SampleLevelAccountant
from node.dp import (
    DPMemoryError,
    DPModelError,
    PartialSharing,
    SiteClip,
    SiteDistributedGaussian,
    SiteLocalGaussian,
    SkellamNoiser,
    SparseVectorTechnique,
    check_dp_memory,
    choose_grad_sample_mode,
    clip_update,
    distributed_skellam_noise,
    estimate_dp_memory,
    integer_noise_headroom,
    integer_noise_variance,
    make_dp_compatible,
    make_dp_filters,
    make_rng,
    svt_epsilon_split,
    validate_model_for_dp,
    wrap_for_dp,
)
from node.model import load_numpy_state, state_to_numpy
from node.train import LocalTrainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _segresnet(norm="group") -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {} if norm == "group" else {"norm": "batch"}
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), **kw)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=4, out_channels=3, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=2)


# ---------------------------------------------------------------------------------------------
# K03: model validation, per-sample gradients, memory


def test_k03_validation_names_unsupported_modules():
    stock = _segresnet()
    problems = validate_model_for_dp(stock)  # hooks mode: the strictest
    assert any(p.startswith("down_layers.0.1.act: ReLU(inplace=True)") for p in problems), problems
    assert any(p.startswith("down_layers.0.1: ResBlock") and "x += identity" in p for p in problems)
    assert validate_model_for_dp(stock, "ew") == []  # ExpandedWeights copes with the in-place ops
    assert choose_grad_sample_mode(stock) == "ew"
    assert validate_model_for_dp(make_dp_compatible(_segresnet()), "hooks") == []

    bn = _segresnet("batch")
    problems = validate_model_for_dp(bn, "ew")
    assert any(p.startswith("down_layers.0.1.norm1: BatchNorm3d") for p in problems), problems
    assert all("BatchNorm" in p for p in problems)
    fixed = make_dp_compatible(_segresnet("batch"), replace_batchnorm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fixed.modules())
    assert validate_model_for_dp(fixed, "auto") == []

    unet = _unet()
    assert choose_grad_sample_mode(unet) == "hooks"
    ew = validate_model_for_dp(unet, "ew")
    assert any("PReLU" in p for p in ew) and any("ConvTranspose3d" in p for p in ew), ew
    assert validate_model_for_dp(unet, "hooks") == []
    with pytest.raises(FedbratsError, match="grad_sample_mode"):
        validate_model_for_dp(unet, "ghost")


def test_stock_segresnet_breaks_hooks_mode_but_not_ew():
    """Why validation flags the in-place ops for hooks mode: Opacus' backward hooks fail on them."""
    from opacus.grad_sample import GradSampleModule

    x = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(RuntimeError, match="modified inplace"):
        GradSampleModule(_segresnet())(x).square().mean().backward()
    GradSampleModule(make_dp_compatible(_segresnet()))(x).square().mean().backward()  # fixed copy: fine


def test_make_dp_compatible_keeps_outputs_and_names():
    model = _segresnet()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        before = model(x).clone()
    keys = list(model.state_dict())
    same = make_dp_compatible(model)
    assert same is model and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("which", ["segresnet", "segresnet-bn", "unet"])
def test_k03_one_private_step_gives_every_parameter_a_per_sample_gradient(which):
    if which == "segresnet":
        model = _segresnet()
    elif which == "segresnet-bn":
        model = make_dp_compatible(_segresnet("batch"), replace_batchnorm=True)
    else:
        model = make_dp_compatible(_unet())
    mode = choose_grad_sample_mode(model)
    assert validate_model_for_dp(model, mode) == []
    est = check_dp_memory(model, 2, (16, 16, 16), "cpu")
    assert est.needed_bytes > 2 * 4 * sum(p.numel() for p in model.parameters()) and est.fits
    assert "needed" in str(est) and "free" in str(est)

    wrapped = wrap_for_dp(model, mode)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    wrapped(x).square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if getattr(p, "grad_sample", None) is None]
    assert not missing, missing
    assert all(p.grad_sample.shape == (2, *p.shape) for _, p in trainable)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # never wrapped twice
    with pytest.raises(DPModelError, match="already wrapped"):
        wrap_for_dp(model, mode)


def test_ew_per_sample_gradients_match_plain_gradients():
    """The per-sample gradients of the stock SegResNet (in-place ops included) average to the
    ordinary gradient of the mean loss."""
    x = torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = _segresnet()
    plain(x).square().mean().backward()
    model = _segresnet()
    wrap_for_dp(model, "ew")(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad_sample.mean(0), q.grad, rtol=1e-3, atol=1e-6), name


def test_memory_estimate_and_refusal(monkeypatch):
    model = _segresnet()
    small = estimate_dp_memory(model, 1, (16, 16, 16))
    big = estimate_dp_memory(model, 4, (32, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    assert big > small > 2 * params * 4
    assert big - estimate_dp_memory(model, 3, (32, 32, 32)) > 2 * params * 4  # per-sample grads grow with B
    monkeypatch.setattr(node_dp, "free_memory_bytes", lambda device="cpu": 2**20)
    with pytest.raises(DPMemoryError, match=r"needed \d+\.\d+ GiB, free 0\.00 GiB") as err:
        check_dp_memory(model, 2, (32, 32, 32), "cpu", site="site-2")
    assert "site-2" in str(err.value) and "batch_size" in str(err.value)
    assert node_dp.free_memory_bytes.__name__ == "<lambda>"
    monkeypatch.undo()
    assert node_dp.free_memory_bytes("cpu") > 0


# ---------------------------------------------------------------------------------------------
# LocalTrainer with DP-SGD


def _tiny_case(i: int, side: int = 16) -> dict:
    rng = np.random.default_rng(i)
    image = rng.normal(0, 0.1, (4, side, side, side)).astype(np.float32) + 1.0
    label = np.zeros((side,) * 3, np.uint8)
    lo = int(rng.integers(2, side // 2))
    label[lo:lo + 5, lo:lo + 5, lo:lo + 5] = 2
    label[lo + 1:lo + 4, lo + 1:lo + 4, lo + 1:lo + 4] = 4
    label[lo + 2, lo + 2, lo + 2] = 1
    image[3][label > 0] += 2.0
    return {"image": image, "label": label, "case_id": f"t{i}"}


class _TinyNet(torch.nn.Module):
    """One 1×1×1 convolution and a GroupNorm: per-sample gradients in microseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(4, 4, 1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.out = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.conv(x))))


def _dp(**kw) -> DPConfig:
    base = {"mode": ("dp-sgd",), "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    return DPConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hundred_cases() -> list[dict]:
    return [_tiny_case(i) for i in range(100)]


def test_k04_one_accountant_across_rounds_optimizers_and_restart(tmp_path, hundred_cases):
    """10 rounds x 1 epoch (q = 1/100, 100 steps), σ=1, C=1, δ=1e-5; a new DP optimizer every
    round and a node restart after round 5: ε equals one accountant over all 1000 steps."""
    training = TrainingConfig(local_steps=100, batch_size=1, patch_size=(8, 8, 8), learning_rate=1e-2,
                              optimizer_restart=True)
    state = tmp_path / SAMPLE_STATE_FILE
    model = _TinyNet()
    trainer = LocalTrainer(model, hundred_cases, training, "2021", "cpu", seed=0, dp_cfg=_dp(),
                           privacy_state=state, site="site-1", noise_seed=7)
    assert trainer.sample_rate == pytest.approx(0.01) and trainer.noise_multiplier == 1.0
    optimizers = []
    for r in range(1, 6):
        res = trainer.train_round(r)
        assert res.steps == 100
        optimizers.append(trainer.optimizer)
    assert len({id(o) for o in optimizers}) == 5  # a new DP optimizer every round ...
    assert trainer._dp.steps_taken == 500  # ... every step taken (empty batches included)
    assert json.loads(state.read_text())["history"] == [[1.0, 0.01, 500]]
    # the model is never wrapped twice
    with pytest.raises(DPModelError, match="already wrapped"):
        LocalTrainer(model, hundred_cases, training, "2021", "cpu", seed=0, dp_cfg=_dp())
    weights = state_to_numpy(model)
    eps5, _ = trainer.privacy_spent()

    # node restart: new process -> new model object, new trainer, ledger reloaded
    model2 = _TinyNet()
    load_numpy_state(model2, weights)
    restarted = LocalTrainer(model2, hundred_cases, training, "2021", "cpu", seed=0, dp_cfg=_dp(),
                             privacy_state=state, site="site-1", noise_seed=8)
    assert restarted.privacy_spent()[0] == pytest.approx(eps5, rel=1e-12)
    for r in range(6, 11):
        restarted.train_round(r)
    eps10, delta = restarted.privacy_spent()
    reference = RDPAccountant()
    for _ in range(1000):
        reference.step(noise_multiplier=1.0, sample_rate=0.01)
    assert delta == 1e-5
    assert eps10 == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert restarted.accountant.steps == 1000 and len(restarted.accountant.rounds) == 10

    # a round that would exceed the budget is refused, nothing trained or charged
    eps11 = restarted.would_be_epsilon(1)
    assert eps11 > eps10
    budgeted = LocalTrainer(_TinyNet(), hundred_cases, training, "2021", "cpu", seed=0,
                            dp_cfg=_dp(epsilon_budget=(eps10 + eps11) / 2), privacy_state=state,
                            site="site-1", noise_seed=9)
    before_file = state.read_text()
    before_weights = state_to_numpy(budgeted.model)
    with pytest.raises(PrivacyBudgetExceeded, match="site site-1: round 11") as err:
        budgeted.train_round(11)
    assert err.value.spent == pytest.approx(eps10) and err.value.would_be == pytest.approx(eps11)
    assert state.read_text() == before_file
    after = state_to_numpy(budgeted.model)
    assert all(np.array_equal(before_weights[k], after[k]) for k in after)
    assert budgeted.privacy_spent()[0] == pytest.approx(eps10, rel=1e-12)


def test_dp_trainer_explicit_save_load_and_noise_from_target(tmp_path, hundred_cases):
    training = TrainingConfig(local_steps=3, batch_size=4, patch_size=(8, 8, 8), optimizer_restart=False)
    cases = hundred_cases[:20]
    trainer = LocalTrainer(_TinyNet(), cases, training, "2021", "cpu", seed=1,
                           dp_cfg=_dp(noise_multiplier=0.0, target_epsilon=3.0), planned_rounds=4, noise_seed=0)
    assert trainer.noise_multiplier > 0.5 and trainer.grad_sample_mode == "ew"
    seen: list[float] = []
    res = trainer.train_round(0, on_step=lambda s, l: seen.append(l))
    assert len(seen) == 3 and res.num_samples == 20
    first = trainer.optimizer
    trainer.train_round(1)
    assert trainer.optimizer is first  # optimizer_restart = False keeps the DP optimizer
    path = tmp_path / "ledger.json"
    trainer.save_state(path)
    # the planned 4 rounds reach the target
    assert trainer.would_be_epsilon(2) <= 3.0 + 0.02
    fresh = LocalTrainer(_TinyNet(), cases, training, "2021", "cpu", seed=1,
                         dp_cfg=_dp(noise_multiplier=0.0, target_epsilon=3.0), planned_rounds=4)
    fresh.load_state(path)
    assert fresh.privacy_spent() == pytest.approx(trainer.privacy_spent())
    plain = LocalTrainer(_TinyNet(), cases, training, "2021", "cpu", seed=1)
    assert not plain.dp_enabled and plain.privacy_spent() == (math.inf, 0.0)
    with pytest.raises(FedbratsError, match="not enabled"):
        plain.save_state(path)


def test_dp_trainer_rejects_bad_config(hundred_cases):
    training = TrainingConfig(local_steps=1, batch_size=2, patch_size=(8, 8, 8))
    cases = hundred_cases[:4]

    def make(**kw):
        return LocalTrainer(_TinyNet(), cases, training, "2021", "cpu", seed=0, **kw)

    with pytest.raises(FedbratsError, match="dp.max_grad_norm"):
        make(dp_cfg=_dp(max_grad_norm=0.0))
    with pytest.raises(FedbratsError, match="dp.delta"):
        make(dp_cfg=_dp(delta=1.0))
    with pytest.raises(FedbratsError, match="dp.accountant"):
        make(dp_cfg=_dp(accountant="gdp"))
    with pytest.raises(FedbratsError, match="planned_rounds"):
        make(dp_cfg=_dp(noise_multiplier=0.0, target_epsilon=1.0))
    with pytest.raises(FedbratsError, match="batch_size = 8 exceeds"):
        LocalTrainer(_TinyNet(), cases, TrainingConfig(batch_size=8, patch_size=(8, 8, 8)), "2021", "cpu",
                     seed=0, dp_cfg=_dp())
    bn = torch.nn.Sequential(torch.nn.Conv3d(4, 3, 1), torch.nn.BatchNorm3d(3))
    with pytest.raises(DPModelError, match=r"1: BatchNorm3d"):
        LocalTrainer(bn, cases, training, "2021", "cpu", seed=0, dp_cfg=_dp())


def test_dp_trainer_on_unet_uses_hooks(hundred_cases):
    training = TrainingConfig(local_steps=2, batch_size=2, patch_size=(16, 16, 16))
    model = _unet()
    trainer = LocalTrainer(model, hundred_cases[:4], training, "2021", "cpu", seed=0, dp_cfg=_dp(),
                           noise_seed=3)
    assert trainer.grad_sample_mode == "hooks" and trainer.memory_estimate.fits
    before = state_to_numpy(model)
    trainer.train_round(0)
    after = state_to_numpy(model)
    assert any(not np.array_equal(before[k], after[k]) for k in after)


# ---------------------------------------------------------------------------------------------
# Site level: clipping and noise statistics


def _delta(seed=0, scale=1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": (scale * rng.normal(size=(30, 40))).astype(np.float32),
            "b.bias": (scale * rng.normal(size=(200,))).astype(np.float32)}


def test_clip_update_global_norm():
    delta = _delta(scale=1.0)
    copy = {k: v.copy() for k, v in delta.items()}
    clipped, norm = clip_update(delta, 2.0)
    expected = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values()))
    assert norm == pytest.approx(expected, rel=1e-9)
    out = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in clipped.values()))
    assert out == pytest.approx(2.0, rel=1e-6)
    ratio = clipped["a.weight"] / delta["a.weight"]
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-5)  # one factor for all tensors
    assert all(np.array_equal(copy[k], delta[k]) for k in delta)  # input untouched
    small, n = clip_update(_delta(scale=1e-3), 100.0)
    assert all(np.allclose(small[k], _delta(scale=1e-3)[k]) for k in small)
    with pytest.raises(FedbratsError, match="site_clip"):
        clip_update(delta, 0.0)


def _zero(n: int) -> dict[str, np.ndarray]:
    return {"w": np.zeros(n, np.float32)}


def test_local_gaussian_noise_has_configured_variance():
    sigma, C = 0.8, 1.5
    f = SiteLocalGaussian(C, sigma, make_rng(1))
    samples = np.concatenate([f(r, _zero(5000))["w"] for r in range(40)]).astype(np.float64)
    assert samples.var() == pytest.approx(sigma**2 * C**2, rel=0.10)
    assert abs(samples.mean()) < 0.02
    # clipping happens before the noise: a huge update ends up with norm ~C plus noise
    big = {"w": np.full(5000, 100.0, np.float32)}
    out = f(99, big)
    assert f.last_clipped and f.last_norm == pytest.approx(100.0 * math.sqrt(5000), rel=1e-6)
    assert float(np.mean(out["w"])) == pytest.approx(C / math.sqrt(5000), abs=0.05)


def test_distributed_gaussian_sum_has_configured_variance():
    sigma, C, n = 1.2, 0.5, 5
    filters = [SiteDistributedGaussian(C, sigma, n, make_rng(10 + i)) for i in range(n)]
    assert filters[0].noise_std == pytest.approx(sigma * C / math.sqrt(n))
    total = np.zeros(200_000)
    for i, f in enumerate(filters):
        share = f(1, _zero(200_000))["w"].astype(np.float64)
        total += share
    assert share.var() == pytest.approx(sigma**2 * C**2 / n, rel=0.10)  # one share is not enough
    assert total.var() == pytest.approx(sigma**2 * C**2, rel=0.10)


def test_skellam_sum_after_dequantisation_has_configured_variance():
    sigma, C, n = 1.0, 0.5, 4
    clip, bits = 0.25, 16
    scale = ((1 << bits) - 1) / (2 * clip)  # levels / (2 clip): integer units per weight unit
    var_int = integer_noise_variance(C, sigma, n, scale)
    assert var_int == pytest.approx((sigma * C * scale) ** 2 / n)
    rngs = [make_rng(100 + i) for i in range(n)]
    shares = [distributed_skellam_noise(100_000, variance_int=var_int, rng=g) for g in rngs]
    assert all(s.dtype == np.int64 for s in shares)
    total = np.sum(shares, axis=0)
    dequantised = total.astype(np.float64) / scale
    assert dequantised.var() == pytest.approx(sigma**2 * C**2, rel=0.10)
    assert abs(dequantised.mean()) < 0.01
    # headroom: the aggregate noise stays within the Bernstein bound
    B = integer_noise_headroom(var_int * n, 2.0**-40)
    assert np.abs(total).max() < B < 20 * math.sqrt(var_int * n)


def test_skellam_noiser_adds_modulo_and_decodes_centred():
    dim, clip, bits, n = 1000, 0.25, 16, 3
    noisers = [SkellamNoiser(0.5, 1.0, n, clip=clip, bits=bits, dim=dim, rng=make_rng(i)) for i in range(n)]
    q = [np.zeros(dim, np.uint32) for _ in range(n)]  # quantised value 0 (= -clip): noise wraps below 0
    noisy = [f(1, qi, modulus_bits=32) for f, qi in zip(noisers, q)]
    assert all(v.dtype == np.uint32 for v in noisy)
    total = np.zeros(dim, np.uint64)
    for v in noisy:
        total = (total + v.astype(np.uint64)) & np.uint64(0xFFFFFFFF)
    centred = np.where(total >= 2**31, total.astype(np.int64) - 2**32, total.astype(np.int64))
    expected = np.sum([distributed_skellam_noise(dim, variance_int=noisers[0].variance_int, rng=make_rng(i))
                       for i in range(n)], axis=0)
    assert np.array_equal(centred, expected)
    with pytest.raises(FedbratsError, match="uint32/uint64"):
        noisers[0](1, np.zeros(dim, np.int64), modulus_bits=32)


def _mask_cfg(mode=("site-distributed",), **secagg):
    from fedbrats.config import SecAggConfig

    sa = {"clip": 0.25, "bits": 20, "modulus_bits": 32, "max_weight": 100, **secagg}
    return Config(federation=FederationConfig(secure_aggregation="mask", sites=3, min_sites=2),
                  secagg=SecAggConfig(**sa), dp=DPConfig(mode=tuple(mode), site_clip=1.0,
                                                         site_noise_multiplier=1.0))


def test_mask_budget_includes_skellam_headroom_widening_to_64_bits():
    from fedbrats.masking import HEADROOM_FAILURE_PROB, quant_params, skellam_headroom

    dim = 20_000
    # 20 value bits + ceil(log2(3 sites x 100)) = 9 + 1 guard bit = 30: fits 2^32 without noise.
    plain = quant_params(_mask_cfg(mode=()))
    assert plain.modulus_bits == 32 and plain.noise_headroom == 0
    assert quant_params(_mask_cfg(mode=()), dim=dim) == plain  # dim matters only with noise
    cfg = _mask_cfg()
    with pytest.raises(FedbratsError, match="pass dim"):
        quant_params(cfg)
    params = quant_params(cfg, dim=dim)
    B = params.noise_headroom
    # The same figure on both ends: the sites' SkellamNoiser with federation.sites shares, and
    # the direct formula: 3 shares of sigma^2 (C*scale + sqrt(d))^2 / min_sites.
    noiser = SkellamNoiser(1.0, 1.0, 2, clip=0.25, bits=20, dim=dim)
    assert B == skellam_headroom(cfg, dim) == noiser.headroom(sites=3)
    scale = ((1 << 20) - 1) / 0.5
    total_var = 3 * (1.0 * scale + math.sqrt(dim)) ** 2 / 2
    assert B == integer_noise_headroom(total_var, HEADROOM_FAILURE_PROB / dim)
    assert 6 * math.sqrt(total_var) < B < 10 * math.sqrt(total_var)
    assert params.modulus_bits == 64 and params.dtype == np.uint64
    assert params.bits == 20 and params.max_sites == 3 and params.max_weight == 100


def test_mask_budget_with_skellam_headroom_refused_naming_the_noise():
    from fedbrats.errors import ConfigError
    from fedbrats.masking import quant_params

    # 36 + 9 + 1 = 46 bits fit 2^64; the noise (sigma C scale ~ 2^37) does not.
    cfg = _mask_cfg(bits=36)
    assert quant_params(_mask_cfg(mode=(), bits=36)).modulus_bits == 64
    with pytest.raises(ConfigError) as err:
        quant_params(cfg, dim=1000)
    text = str(err.value)
    assert "bits of noise headroom for DP noise within" in text
    assert "bits needed, but the largest modulus, 2^64, has 64 bits available" in text
    assert "dp.site_noise_multiplier" in text


def test_filters_do_not_modify_input_and_record_ledgers(tmp_path):
    delta = _delta()
    copy = {k: v.copy() for k, v in delta.items()}
    f = SiteLocalGaussian(1.0, 1.0, make_rng(0), state_path=tmp_path / "site.json", site="s1", delta=1e-5)
    out = f(1, delta)
    f(2, delta)
    assert all(np.array_equal(copy[k], delta[k]) for k in delta)
    assert all(out[k].dtype == np.float32 and out[k].shape == delta[k].shape for k in delta)
    back = json.loads((tmp_path / "site.json").read_text())
    assert back["history"] == [[1.0, 1.0, 2]] and [r["round"] for r in back["rounds"]] == [1, 2]
    again = SiteLocalGaussian(1.0, 1.0, make_rng(0), state_path=tmp_path / "site.json", site="s1", delta=1e-5)
    assert again.accountant.releases == 2  # a restarted node continues the site-level ledger
    with pytest.raises(FedbratsError, match="non-finite"):
        f(3, {"w": np.array([np.nan], np.float32)})


# ---------------------------------------------------------------------------------------------
# Partial sharing and SVT


def test_partial_sharing_keeps_exactly_the_top_fraction():
    delta = _delta(3)
    out = PartialSharing(0.1)(1, delta)
    flat_in = np.concatenate([v.ravel() for v in delta.values()])
    flat_out = np.concatenate([out[k].ravel() for k in delta])
    k = math.ceil(0.1 * flat_in.size)
    kept = np.flatnonzero(flat_out)
    assert kept.size == k
    assert np.array_equal(flat_out[kept], flat_in[kept])
    threshold = np.sort(np.abs(flat_in))[-k]
    assert np.all(np.abs(flat_in[kept]) >= threshold)
    assert np.sum(np.abs(flat_in) > threshold) < k  # nothing larger was left out
    assert PartialSharing(1.0)(1, delta)["a.weight"].tolist() == delta["a.weight"].tolist()
    with pytest.raises(FedbratsError, match="partial_fraction"):
        PartialSharing(0.0)


def test_svt_epsilon_split():
    for eps, c in [(1.0, 1), (0.5, 120), (3.0, 117_685)]:
        e1, e2, e3 = svt_epsilon_split(eps, c)
        assert e2 / e1 == pytest.approx((2 * c) ** (2 / 3), rel=1e-12)
        assert e3 == e2 and e1 + e2 + e3 == pytest.approx(eps, rel=1e-12)


def test_svt_selects_at_most_c_within_gamma_and_charges_epsilon(tmp_path):
    gamma, tau = 1e-2, 5e-3
    delta = _delta(4, scale=0.01)
    K = sum(v.size for v in delta.values())
    svt = SparseVectorTechnique(1.0, gamma, tau, 0.05, make_rng(5), state_path=tmp_path / "pure.json")
    for r in range(1, 4):
        out = svt(r, delta)
        flat = np.concatenate([out[k].ravel() for k in delta])
        c = math.ceil(0.05 * K)
        assert svt.last_c == c and svt.last_selected <= c
        assert np.count_nonzero(flat) <= c and np.all(np.abs(flat) <= gamma)
        assert svt.last_split == pytest.approx(svt_epsilon_split(1.0, c))
    assert svt.accountant.epsilon() == pytest.approx(3.0)
    assert json.loads((tmp_path / "pure.json").read_text())["charges"] == [1.0, 1.0, 1.0]


def test_svt_with_little_noise_releases_the_coordinates_above_threshold():
    """With a huge ε the noise vanishes: exactly the c coordinates above τ are released, each
    clipped to ±γ."""
    values = np.zeros(1000, np.float32)
    big = np.array([3, 50, 400, 999])
    values[big] = [0.5, -0.7, 0.02, -0.03]
    svt = SparseVectorTechnique(1e9, 0.05, 0.01, 0.004, make_rng(6))  # c = 4
    out = svt(1, {"w": values})["w"]
    assert svt.last_c == 4 and svt.last_selected == 4
    assert np.array_equal(np.flatnonzero(out), big)
    assert np.allclose(out[big], [0.05, -0.05, 0.02, -0.03], atol=1e-6)


def test_svt_budget_refusal():
    from node.accounting import PureDPAccountant

    acc = PureDPAccountant(site="s")
    svt = SparseVectorTechnique(1.0, 1e-3, 1e-3, 0.1, make_rng(0), accountant=acc, budget=2.5, site="s")
    svt(1, _delta())
    svt(2, _delta())
    with pytest.raises(PrivacyBudgetExceeded, match="round 3"):
        svt(3, _delta())
    assert acc.epsilon() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# Wiring


def _cfg(mode, secure="mask", state_dir=""):
    return Config(federation=FederationConfig(secure_aggregation=secure, min_sites=2),
                  node=NodeConfig(site_id="site-1", state_dir=state_dir), dp=DPConfig(mode=tuple(mode)))


def test_make_dp_filters(tmp_path):
    assert make_dp_filters(_cfg(())) == [] and make_dp_filters(_cfg(("dp-sgd",))) == []
    names = [f.name for f in make_dp_filters(_cfg(("partial", "site-local", "svt"), state_dir=str(tmp_path)))]
    assert names == ["svt", "site-local", "partial"]
    assert [f.name for f in make_dp_filters(_cfg(("site-distributed",)))] == ["site-clip"]
    dist = make_dp_filters(_cfg(("site-distributed",), secure="ckks"))[0]
    assert isinstance(dist, SiteDistributedGaussian) and dist.n_sites == 2
    assert isinstance(make_dp_filters(_cfg(("site-distributed",)))[0], SiteClip)
    with pytest.raises(FedbratsError, match="needs secure aggregation"):
        make_dp_filters(_cfg(("site-distributed",), secure="none"))
    with pytest.raises(FedbratsError, match="not both"):
        make_dp_filters(_cfg(("site-local", "site-distributed")))
    with pytest.raises(FedbratsError, match="'partial' cannot follow"):
        make_dp_filters(_cfg(("site-distributed", "partial")))
    with pytest.raises(FedbratsError, match="unknown mechanism"):
        make_dp_filters(_cfg(("laplace",)))


def test_make_rng_is_seeded_from_urandom_by_default():
    a, b = make_rng(), make_rng()
    assert a.integers(2**62) != b.integers(2**62)
    assert make_rng(5).integers(2**62) == make_rng(5).integers(2**62)
    with pytest.raises(FedbratsError, match="seed"):
        make_rng(-1)
    acc = SampleLevelAccountant()
    assert acc.epsilon(1e-5) == 0.0


def test_aggregator_refuses_at_start_up_when_the_noise_headroom_does_not_fit():
    from aggregator.server import AggregatorCore
    from fedbrats.errors import ConfigError

    model = {"w": np.zeros(1000, np.float32)}
    with pytest.raises(ConfigError, match="bits of noise headroom"):
        AggregatorCore(_mask_cfg(bits=36), model, save_model=lambda p, t, r: None)
    # the same federation without the noise starts
    AggregatorCore(_mask_cfg(mode=(), bits=36), model, save_model=lambda p, t, r: None)


def test_ckks_refuses_dp_noise_the_parameters_cannot_sum():
    from aggregator.ckks import check_dp_noise_fits
    from fedbrats.config import CKKSConfig
    from fedbrats.errors import ConfigError

    def cfg(sigma, mode=("site-distributed",)):
        return Config(federation=FederationConfig(secure_aggregation="ckks", sites=3, min_sites=3),
                      ckks=CKKSConfig(max_abs_value=1.0),
                      dp=DPConfig(mode=mode, site_clip=20.0, site_noise_multiplier=sigma))

    assert check_dp_noise_fits(cfg(0.0005)) == pytest.approx(1.0 + 12 * 0.0005 * 20 / 3 ** 0.5)
    assert check_dp_noise_fits(cfg(0.0005, mode=("dp-sgd",))) == 1.0  # no update noise
    with pytest.raises(ConfigError) as err:
        check_dp_noise_fits(cfg(1e9))
    text = str(err.value)
    assert "dp.site_noise_multiplier = 1e+09" in text and "dp.site_clip = 20" in text
    assert "headroom" in text
    with pytest.raises(ConfigError, match="dp.site_noise_multiplier"):
        check_dp_noise_fits(cfg(1e9, mode=("site-local",)))
