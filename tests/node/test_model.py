"""node.model: SegResNet presets, device choice, numpy weights, the model file."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedbrats.config import ModelConfig
from fedbrats.errors import FedbratsError
from node.model import (
    MODEL_FILE_FORMAT,
    build_model,
    load_model_file,
    load_numpy_state,
    read_model_file,
    save_model_file,
    select_device,
    state_to_numpy,
    tensors_sha256,
)


def _model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**kw))


# ---------------------------------------------------------------------------------------------
# Network


@pytest.mark.parametrize(
    ("cfg", "filters", "params"),
    [
        (ModelConfig(preset="cpu-small"), 8, 1_176_843),
        (ModelConfig(preset="paper"), 16, 4_702_227),
        (ModelConfig(preset="cpu-small", init_filters=16), 16, 4_702_227),
        (ModelConfig(preset="paper", init_filters=8), 8, 1_176_843),
    ],
)
def test_presets_and_parameter_counts(cfg, filters, params):
    m = build_model(cfg)
    assert m.convInit.conv.out_channels == filters
    assert m.convInit.conv.in_channels == 4
    assert sum(p.numel() for p in m.parameters()) == params
    assert not hasattr(m, "vae_down")  # plain SegResNet, no VAE branch


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (ModelConfig(preset="huge"), "preset"),
        (ModelConfig(init_filters=-8), "init_filters"),
        (ModelConfig(init_filters=12), "multiple of 8"),
    ],
)
def test_bad_model_config(cfg, match):
    with pytest.raises(FedbratsError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("side", [16, 32])
def test_forward_shape(side):
    m = _model().eval()
    with torch.inference_mode():
        y = m(torch.randn(2, 4, side, side, side))
    assert y.shape == (2, 3, side, side, side)
    assert torch.isfinite(y).all()


def test_select_device(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(FedbratsError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(FedbratsError, match="tpu"):
        select_device("tpu")


# ---------------------------------------------------------------------------------------------
# Numpy weights


def test_state_to_numpy_round_trip():
    src, dst = _model(0), _model(1)
    state = state_to_numpy(src)
    assert list(state) == list(src.state_dict())
    for name, arr in state.items():
        assert arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"], name
        assert arr.shape == tuple(src.state_dict()[name].shape)
    # copies, not views of the live parameters
    before = state["convInit.conv.weight"].copy()
    with torch.no_grad():
        src.convInit.conv.weight.add_(1.0)
    np.testing.assert_array_equal(state["convInit.conv.weight"], before)

    param = dst.convInit.conv.weight
    load_numpy_state(dst, state)
    assert dst.convInit.conv.weight is param  # updated in place (optimisers stay attached)
    for name, arr in state_to_numpy(dst).items():
        np.testing.assert_array_equal(arr, state[name])


def test_load_numpy_state_errors_name_the_tensor():
    m = _model()
    good = state_to_numpy(m)
    original = m.convInit.conv.weight.detach().clone()

    missing = dict(good)
    del missing["up_layers.0.0.conv1.conv.weight"]
    with pytest.raises(FedbratsError, match=r"missing.*up_layers\.0\.0\.conv1\.conv\.weight"):
        load_numpy_state(m, missing)

    extra = dict(good, **{"head.bogus": np.zeros(3, np.float32)})
    with pytest.raises(FedbratsError, match=r"unexpected.*head\.bogus"):
        load_numpy_state(m, extra)

    bad_shape = {k: (np.zeros((1, 2), np.float32) if k == "conv_final.2.conv.bias" else v)
                 for k, v in good.items()}
    with pytest.raises(FedbratsError, match=r"conv_final\.2\.conv\.bias.*\(1, 2\).*\(3,\)"):
        load_numpy_state(m, bad_shape)

    nan = {k: (np.full_like(v, np.nan) if k == "convInit.conv.weight" else v) for k, v in good.items()}
    with pytest.raises(FedbratsError, match=r"convInit\.conv\.weight.*NaN"):
        load_numpy_state(m, nan)

    # a failed load changes nothing
    torch.testing.assert_close(m.convInit.conv.weight.detach(), original)


# ---------------------------------------------------------------------------------------------
# Model file


def _save(tmp_path, model, cfg=ModelConfig(), **kw):
    args = {"labels": "2023", "round": 3, "federation": "fed-x", **kw}
    return save_model_file(tmp_path / "m" / "model.pt", state_to_numpy(model), model_cfg=cfg, **args)


def test_model_file_round_trip(tmp_path):
    src = _model(0)
    path = _save(tmp_path, src)
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp files left

    loaded, meta = load_model_file(path)
    assert meta["format"] == MODEL_FILE_FORMAT
    assert meta["model_config"] == ModelConfig()
    assert (meta["labels"], meta["round"], meta["federation"]) == ("2023", 3, "fed-x")
    assert meta["sha256"] == tensors_sha256(state_to_numpy(src))
    assert not loaded.training
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), src.eval()(x))

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == MODEL_FILE_FORMAT
    assert raw["model"] == {"preset": "cpu-small", "init_filters": 0}
    assert list(raw["tensors"]) == list(src.state_dict())


def test_model_file_tampered_tensor_rejected(tmp_path):
    path = _save(tmp_path, _model())
    raw = torch.load(path, weights_only=True)
    raw["tensors"]["conv_final.2.conv.bias"] += 0.5  # keep the old sha256
    torch.save(raw, path)
    with pytest.raises(FedbratsError, match=rf"{re.escape(str(path))}.*SHA-256"):
        load_model_file(path)


def test_model_file_corrupted_bytes_rejected(tmp_path):
    path = _save(tmp_path, _model())
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(FedbratsError, match=re.escape(str(path))):
        load_model_file(path)
    path.write_bytes(bytes(blob[:2000]))  # truncated
    with pytest.raises(FedbratsError, match=rf"{re.escape(str(path))}.*not a fedbrats model file"):
        load_model_file(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda raw: raw.update(format="other/9"), "format tag"),
        (lambda raw: raw.pop("federation"), "missing field"),
        (lambda raw: raw.update(labels="2019"), "labels"),
        (lambda raw: raw.update(round=-1), "round"),
        (lambda raw: raw.update(model={"preset": "paper", "init_filters": 0}), "shape"),
    ],
)
def test_model_file_bad_metadata_rejected(tmp_path, edit, match):
    path = _save(tmp_path, _model())
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)
    with pytest.raises(FedbratsError, match=match) as info:
        load_model_file(path)
    assert str(path) in str(info.value)


class _Evil:
    pass


def test_model_file_with_code_or_missing_is_rejected(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FILE_FORMAT, "x": _Evil()}, path)
    with pytest.raises(FedbratsError, match=re.escape(str(path))):
        load_model_file(path)  # weights_only=True refuses to unpickle the class
    with pytest.raises(FedbratsError, match="no such file"):
        read_model_file(tmp_path / "absent.pt")


def test_save_model_file_refuses_state_of_another_model(tmp_path):
    paper_state = state_to_numpy(_model(preset="paper"))
    with pytest.raises(FedbratsError, match=r"convInit\.conv\.weight.*shape"):
        save_model_file(tmp_path / "x.pt", paper_state, model_cfg=ModelConfig(), labels="2021",
                        round=0, federation="f")
    with pytest.raises(FedbratsError, match="labels"):
        save_model_file(tmp_path / "x.pt", paper_state, model_cfg=ModelConfig(preset="paper"),
                        labels="2020", round=0, federation="f")
    assert not (tmp_path / "x.pt").exists()
