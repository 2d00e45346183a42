"""node.train and node.predict on tiny synthetic volumes made here (no files from outside)."""

from __future__ import annotations

import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrats.config import EvaluationConfig, ModelConfig, TrainingConfig
from fedbrats.errors import FedbratsError
from node.model import build_model, load_numpy_state, save_model_file, state_to_numpy
from node.predict import predict_case
from node.train import LocalTrainer, TrainResult, configure_torch, evaluate, seed_everything

SHAPE = (40, 40, 40)
ROI = EvaluationConfig(roi_size=(32, 32, 32), overlap=0.25, threshold=0.5)


def make_case(seed: int, *, shape=SHAPE, tumour: bool = True, et_label: int = 4) -> dict:
    """A load_case-style dict: an ellipsoid "head" (background exactly 0 outside), and a cube
    tumour: oedema shell (2), enhancing rim (ET), necrotic core (1); bright in FLAIR/T1ce/T2."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    head = sum(((g - s / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, shape)) < 1
    image = np.zeros((4, *shape), np.float32)
    image[:, head] = 1.0 + rng.normal(0, 0.2, (4, int(head.sum())))
    label = np.zeros(shape, np.uint8)
    if tumour:
        size = int(rng.integers(8, 13))
        lo = [int(rng.integers(int(0.25 * s), int(0.75 * s) - size)) for s in shape]

        def box(margin: int):
            return tuple(slice(a + margin, a + size - margin) for a in lo)

        label[box(0)], label[box(2)], label[box(3)] = 2, et_label, 1
        image[3][label > 0] += 2.0
        image[1][label == et_label] += 2.0
        image[2][label == 1] += 1.5
    return {"image": image, "label": label, "affine": np.diag([2.0, 2.0, 2.0, 1.0]), "case_id": f"c{seed}"}


def _model(seed: int = 0) -> torch.nn.Module:
    seed_everything(seed)
    return build_model(ModelConfig(preset="cpu-small"))


def _training(**kw) -> TrainingConfig:
    base = {"local_steps": 4, "batch_size": 2, "patch_size": (32, 32, 32), "learning_rate": 5e-3}
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [make_case(i) for i in range(4)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    configure_torch(TrainingConfig(num_threads=1))
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Training


def test_train_round_runs_exact_steps_and_loss_decreases(cases):
    model = _model()
    trainer = LocalTrainer(model, cases, _training(local_steps=8), "2021", "cpu", seed=0)
    seen: list[tuple[int, float]] = []
    results = [trainer.train_round(r, on_step=lambda s, l: seen.append((s, l))) for r in range(3)]
    assert all(isinstance(r, TrainResult) for r in results)
    assert [r.steps for r in results] == [8, 8, 8]
    assert [s for s, _ in seen] == list(range(1, 9)) * 3
    assert all(r.num_samples == 4 and r.seconds > 0 and 0 <= r.mean_loss <= 1 for r in results)
    assert results[-1].mean_loss < results[0].mean_loss - 0.03, [r.mean_loss for r in results]
    assert model.training


def test_train_round_is_deterministic_given_seed_and_round(cases):
    tiny = _training(local_steps=2, patch_size=(16, 16, 16), optimizer_restart=True)

    def run(seed):
        model = _model(0)
        LocalTrainer(model, cases, tiny, "2021", "cpu", seed).train_round(5)
        return state_to_numpy(model)

    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)

    # round 5 does not depend on the rounds run before it (a restarted node repeats it exactly)
    model = _model(0)
    start = state_to_numpy(model)
    trainer = LocalTrainer(model, cases, tiny, "2021", "cpu", 1)
    trainer.train_round(4)
    load_numpy_state(model, start)
    trainer.train_round(5)
    d = state_to_numpy(model)
    assert all(np.array_equal(a[k], d[k]) for k in a)


@pytest.mark.parametrize("restart", [True, False])
def test_optimizer_restart(cases, restart):
    model = _model()
    steps = 2
    trainer = LocalTrainer(
        model, cases, _training(local_steps=steps, patch_size=(16, 16, 16), optimizer_restart=restart),
        "2021", "cpu", seed=0,
    )
    global_weights = state_to_numpy(model)
    trainer.train_round(0)
    first = trainer.optimizer
    load_numpy_state(model, global_weights)  # the node sets the new global model in place
    trainer.train_round(1)
    param = next(model.parameters())
    adam_steps = int(trainer.optimizer.state[param]["step"])
    if restart:
        assert trainer.optimizer is not first and adam_steps == steps  # moments reset each round
    else:
        assert trainer.optimizer is first and adam_steps == 2 * steps  # moments carried over


def test_trainer_rejects_bad_input(cases):
    model = _model()
    with pytest.raises(FedbratsError, match="at least one"):
        LocalTrainer(model, [], _training(), "2021", "cpu", seed=0)
    unlabelled = dict(cases[0], label=None, case_id="BraTS_007")
    with pytest.raises(FedbratsError, match="BraTS_007"):
        LocalTrainer(model, [unlabelled], _training(), "2021", "cpu", seed=0)
    with pytest.raises(FedbratsError, match="labels"):
        LocalTrainer(model, cases, _training(), "2019", "cpu", seed=0)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _constant_model(logit: float) -> torch.nn.Module:
    """A network whose every output is ``logit`` (final 1x1x1 conv zeroed, bias set)."""
    model = _model()
    conv = model.conv_final[-1].conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(logit)
    return model


def test_evaluate_keys_ranges_and_mode(cases):
    model = _model()
    model.train()
    out = evaluate(model, cases[:2], ROI, labels="2021", device="cpu")
    assert set(out) == {"tc", "wt", "et", "mean", "hd95_tc", "hd95_wt", "hd95_et", "hd95_mean", "num_cases"}
    assert out["num_cases"] == 2
    for key in ("tc", "wt", "et", "mean"):
        assert isinstance(out[key], float) and 0.0 <= out[key] <= 1.0
    assert math.isclose(out["mean"], (out["tc"] + out["wt"] + out["et"]) / 3, rel_tol=1e-6)
    for key in ("hd95_tc", "hd95_wt", "hd95_et", "hd95_mean"):
        assert out[key] is None or (isinstance(out[key], float) and math.isfinite(out[key]) and out[key] >= 0)
    assert model.training  # mode restored


def test_evaluate_empty_region_conventions(cases):
    healthy = make_case(99, tumour=False)
    nothing = _constant_model(-50.0)
    # empty prediction, empty truth: Dice 1, HD95 0
    out = evaluate(nothing, [healthy], ROI, labels="2021", device="cpu")
    assert (out["tc"], out["wt"], out["et"], out["mean"]) == (1.0, 1.0, 1.0, 1.0)
    assert (out["hd95_tc"], out["hd95_wt"], out["hd95_et"], out["hd95_mean"]) == (0.0, 0.0, 0.0, 0.0)
    # empty prediction of a real tumour: Dice 0, HD95 undefined -> None (never NaN)
    out = evaluate(nothing, [cases[0]], ROI, labels="2021", device="cpu")
    assert out["mean"] == 0.0
    assert out["hd95_tc"] is None and out["hd95_mean"] is None
    # everything predicted: small Dice, finite HD95 in mm (voxels are 2 mm)
    everything = _constant_model(50.0)
    out = evaluate(everything, [cases[0]], ROI, labels="2021", device="cpu")
    assert 0.0 < out["wt"] < 0.2
    assert out["hd95_wt"] is not None and out["hd95_wt"] > 10.0


def test_evaluate_rejects_unlabelled_case(cases):
    with pytest.raises(FedbratsError, match="c1"):
        evaluate(_model(), [dict(cases[1], label=None)], ROI, labels="2021", device="cpu")
    with pytest.raises(FedbratsError, match="at least one"):
        evaluate(_model(), [], ROI, labels="2021", device="cpu")


# ---------------------------------------------------------------------------------------------
# Prediction


_NAMES = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}),
}


def _write_case(folder, labels: str, case: dict, affine: np.ndarray, *, skip: str | None = None):
    sep, names = _NAMES[labels]
    folder.mkdir(parents=True, exist_ok=True)
    cid = folder.name
    for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        if modality == skip:
            continue
        img = nib.Nifti1Image(case["image"][channel], affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(folder / f"{cid}{sep}{names[modality]}.nii.gz"))
    # a segmentation in the *other* convention: predict must ignore it (preflight would refuse it)
    wrong = np.where(case["label"] == 4, 3, np.where(case["label"] == 3, 4, case["label"])).astype(np.uint8)
    nib.save(nib.Nifti1Image(wrong, affine), str(folder / f"{cid}{sep}seg.nii.gz"))


@pytest.mark.parametrize("labels", ["2021", "2023"])
def test_predict_case_writes_aligned_brats_labels(tmp_path, labels):
    et = 4 if labels == "2021" else 3
    case = make_case(7, shape=(40, 48, 32), et_label=et)
    affine = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -120.0], [0, 0, 2.0, -60.0], [0, 0, 0, 1]])
    case_dir = tmp_path / "BraTS-CASE-00007"
    _write_case(case_dir, labels, case, affine)

    model = _constant_model(0.0)
    with torch.no_grad():  # TC, WT off; ET on -> everything becomes the ET label
        model.conv_final[-1].conv.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
    model_file = save_model_file(tmp_path / "model.pt", state_to_numpy(model), model_cfg=ModelConfig(),
                                 labels=labels, round=2, federation="fed-test")
    out_file = predict_case(model_file, case_dir, tmp_path / "out" / "pred.nii.gz",
                            evaluation=ROI, device="cpu")

    assert out_file == tmp_path / "out" / "pred.nii.gz"
    img = nib.load(str(out_file))
    seg = np.asanyarray(img.dataobj)
    assert seg.dtype == np.uint8 and seg.shape == (40, 48, 32)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 2.0), atol=1e-6)
    assert int(img.header["qform_code"]) > 0 or int(img.header["sform_code"]) > 0
    assert set(np.unique(seg)) <= set((0, 1, 2, et))
    assert set(np.unique(seg)) == {et}


def test_predict_case_with_a_trained_model_gives_only_brats_labels(tmp_path, cases):
    model = _model()
    LocalTrainer(model, cases, _training(local_steps=3), "2021", "cpu", seed=0).train_round(0)
    model_file = save_model_file(tmp_path / "model.pt", state_to_numpy(model), model_cfg=ModelConfig(),
                                 labels="2021", round=1, federation="f")
    case_dir = tmp_path / "Case_1"
    _write_case(case_dir, "2021", make_case(11), np.diag([2.0, 2.0, 2.0, 1.0]))
    seg = np.asanyarray(nib.load(str(predict_case(model_file, case_dir, tmp_path / "p.nii", evaluation=ROI,
                                                  device="cpu"))).dataobj)
    assert seg.shape == SHAPE and set(np.unique(seg)) <= {0, 1, 2, 4}


def test_predict_case_missing_modality_names_case_dir(tmp_path):
    case_dir = tmp_path / "BraTS2021_00042"
    _write_case(case_dir, "2021", make_case(3), np.eye(4), skip="flair")
    model_file = save_model_file(tmp_path / "model.pt", state_to_numpy(_model()), model_cfg=ModelConfig(),
                                 labels="2021", round=0, federation="f")
    with pytest.raises(FedbratsError, match=rf"(?s){re.escape(str(case_dir))}.*flair"):
        predict_case(model_file, case_dir, tmp_path / "p.nii.gz", evaluation=ROI, device="cpu")
    assert not (tmp_path / "p.nii.gz").exists()


def test_learning_rate_decays_geometrically_to_the_final_rate():
    from node.train import learning_rate_at

    tr = _training(learning_rate=3e-3, final_learning_rate_ratio=1 / 3)
    rates = [learning_rate_at(tr, r, 4) for r in range(1, 6)]
    assert rates[0] == 3e-3 and abs(rates[3] - 1e-3) < 1e-15 and rates[4] == rates[3]
    assert all(abs(b / a - (1 / 3) ** (1 / 3)) < 1e-12 for a, b in zip(rates[:3], rates[1:4]))
    assert learning_rate_at(_training(learning_rate=3e-3, final_learning_rate_ratio=1.0), 4, 4) == 3e-3
    # the ratio scales with learning_rate: a smaller rate never climbs towards a fixed final one
    small = [learning_rate_at(_training(learning_rate=1e-4), r, 5) for r in range(1, 6)]
    assert small[0] == 1e-4 and all(b < a for a, b in zip(small, small[1:]))
    assert learning_rate_at(tr, 3, None) == 3e-3  # no plan: constant


def test_trainer_applies_the_round_learning_rate_with_and_without_restart(cases):
    for restart in (True, False):
        model = _model()
        tr = _training(local_steps=1, learning_rate=4e-3, final_learning_rate_ratio=0.25,
                       optimizer_restart=restart)
        trainer = LocalTrainer(model, cases, tr, "2021", "cpu", seed=0, planned_rounds=3)
        seen = []
        for r in (1, 2, 3):
            trainer.train_round(r)
            seen.append(trainer.optimizer.param_groups[0]["lr"])
        assert all(abs(a - b) < 1e-12 for a, b in zip(seen, [4e-3, 2e-3, 1e-3], strict=True))
