"""The segmentation network, its weights as numpy arrays, and the self-describing model file.

The network is MONAI's :class:`~monai.networks.nets.SegResNet`, the encoder-decoder of
Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization", BrainLes 2018
(arXiv:1810.11654), without the VAE branch, as used for federated BraTS by Li et al.,
"Privacy-preserving Federated Brain Tumour Segmentation", MLMI 2019 (arXiv:1910.00962):
4 input channels (T1, T1ce, T2, FLAIR), 3 output channels holding *logits* of the overlapping
regions TC, WT, ET (apply a sigmoid outside the network), ``blocks_down=(1, 2, 2, 4)``,
``blocks_up=(1, 1, 1)``, group normalisation (8 groups), ReLU.

Presets (``ModelConfig.preset``):

========== ============ ============
preset     init_filters parameters
========== ============ ============
cpu-small  8            1,176,843
paper      16           4,702,227
========== ============ ============

``ModelConfig.init_filters > 0`` overrides the preset's number of first-level filters.

Weights travel between parties as ``dict[str, np.ndarray]`` (:func:`state_to_numpy`,
:func:`load_numpy_state`).  Only floating-point ``state_dict`` entries are part of that dict:
integer buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot be averaged and are left
out; the stock SegResNet (GroupNorm) has none, so every entry is included.

The model file (:func:`save_model_file`, :func:`load_model_file`) is one ``torch.save`` of a
plain dict that ``torch.load(weights_only=True)`` reads back without unpickling code::

    {
        "format": "fedbrats-model/1",
        "model": {"preset": "cpu-small", "init_filters": 0},   # ModelConfig as a dict
        "labels": "2021",                                       # BraTS label convention
        "round": 3,                                             # federated round it came from
        "federation": "fedbrats-demo",
        "sha256": "<hex>",                                      # tensors_sha256(tensors)
        "tensors": {name: torch.Tensor (float32), ...},         # state_dict order
    }
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import SegResNet

from fedbrats.config import LABEL_CONVENTIONS, MODEL_PRESETS, ModelConfig
from fedbrats.errors import ConfigError, FedbratsError

MODEL_FILE_FORMAT = "fedbrats-model/1"
"""Format tag written into every model file; a file with another tag is refused."""

PRESET_INIT_FILTERS: dict[str, int] = {"cpu-small": 8, "paper": 16}
"""First-level filters of each :data:`fedbrats.config.MODEL_PRESETS` entry."""

IN_CHANNELS = 4
"""Input modalities, in :data:`node.data.MODALITIES` order (t1, t1ce, t2, flair)."""

OUT_CHANNELS = 3
"""Output regions, in :data:`node.data.REGIONS` order (tc, wt, et)."""

_META_KEYS = ("format", "model", "labels", "round", "federation", "sha256", "tensors")


# ---------------------------------------------------------------------------------------------
# Network and device


def init_filters_for(cfg: ModelConfig) -> int:
    """Number of first-level filters ``cfg`` asks for (the override, else the preset's).

    Raises:
        FedbratsError: unknown preset, or ``init_filters`` negative or not a multiple of 8.
    """
    if not isinstance(cfg.preset, str) or cfg.preset not in PRESET_INIT_FILTERS:
        raise FedbratsError(
            f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(MODEL_PRESETS)})"
        )
    if not isinstance(cfg.init_filters, int) or isinstance(cfg.init_filters, bool) or cfg.init_filters < 0:
        raise FedbratsError(f"model.init_filters: must be an integer >= 0, got {cfg.init_filters!r}")
    if cfg.init_filters % 8:
        raise FedbratsError(
            f"model.init_filters: must be a multiple of 8 (SegResNet's GroupNorm has 8 groups), "
            f"got {cfg.init_filters}"
        )
    return cfg.init_filters if cfg.init_filters > 0 else PRESET_INIT_FILTERS[cfg.preset]


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """Build the SegResNet of Myronenko 2018 (arXiv:1810.11654) without the VAE branch.

    The network maps ``(B, 4, X, Y, Z)`` float images (T1, T1ce, T2, FLAIR, normalised) to
    ``(B, 3, X, Y, Z)`` logits of TC, WT, ET; apply ``torch.sigmoid`` outside.  Each spatial
    side must be a multiple of 8 (three 2x downsamplings).  Weights are initialised from
    torch's global RNG: seed it first (``node.train.seed_everything``) for identical initial
    weights at every party.

    Args:
        cfg: model section of the config; ``preset`` ``cpu-small`` (8 filters) or ``paper``
            (16 filters, Li et al. 2019 arXiv:1910.00962); ``init_filters > 0`` (a multiple
            of 8, for the 8-group GroupNorm) overrides.

    Returns:
        The network on the CPU, in train mode.

    Raises:
        FedbratsError: unknown preset or invalid ``init_filters``.
    """
    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters_for(cfg),
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        dropout_prob=None,
    )


def select_device(name: str) -> torch.device:
    """Resolve ``training.device`` to a torch device.

    Args:
        name: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Raises:
        ConfigError: ``cuda`` was asked for but CUDA is not available, or ``name`` is unknown.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            raise ConfigError("training.device", [
                f"'cuda' but CUDA is not available (torch {torch.__version__}, built with "
                f"{build}, {torch.cuda.device_count()} GPU(s) visible); use 'auto' or 'cpu'"])
        return torch.device("cuda")
    raise ConfigError("training.device", [f"must be one of auto, cpu, cuda, got {name!r}"])


# ---------------------------------------------------------------------------------------------
# Weights as numpy


def _float_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the model's weights out as numpy arrays.

    Args:
        model: any module (on any device).

    Returns:
        ``{name: float32 C-contiguous array}`` for every floating-point ``state_dict`` entry,
        in ``state_dict`` order.  The arrays are copies: later training does not change them.
        Integer buffers (none in SegResNet) are left out: they cannot be averaged.
    """
    out: dict[str, np.ndarray] = {}
    for name, t in _float_entries(model).items():
        out[name] = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32).copy()
    return out


def load_numpy_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Set the model's floating-point weights from numpy arrays, in place.

    Parameters are updated with ``copy_`` so that an optimiser holding them keeps working.
    Arrays are cast to each tensor's dtype and device.

    Args:
        model: the module to update.
        state: exactly the names :func:`state_to_numpy` returns for this model, each with the
            same shape and finite values.

    Raises:
        FedbratsError: a name is missing or unexpected, a shape differs, an entry is not a
            numeric array or holds NaN/inf; the message names the tensor.  Nothing is changed
            when an error is raised.
    """
    if not isinstance(state, Mapping):
        raise FedbratsError(f"model state: expected a mapping of name -> array, got {type(state).__name__}")
    expected = _float_entries(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected tensor(s): {', '.join(map(str, unexpected[:5]))}"
                + (" ..." if len(unexpected) > 5 else "")
            )
        raise FedbratsError(f"model state does not match the network: {'; '.join(parts)}")
    converted: dict[str, torch.Tensor] = {}
    for name, target in expected.items():
        value = state[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise FedbratsError(
                f"model state: tensor {name!r}: expected a numeric numpy array, got "
                f"{type(value).__name__}{'' if not isinstance(value, np.ndarray) else ' of ' + str(value.dtype)}"
            )
        if tuple(value.shape) != tuple(target.shape):
            raise FedbratsError(
                f"model state: tensor {name!r}: shape {tuple(value.shape)} does not match the "
                f"network's {tuple(target.shape)}"
            )
        if not np.all(np.isfinite(value)):
            raise FedbratsError(f"model state: tensor {name!r}: contains NaN or infinite values")
        converted[name] = torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype)
    model.load_state_dict(converted, strict=False)


# ---------------------------------------------------------------------------------------------
# Model file


def tensors_sha256(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over named arrays, in mapping order.

    For each entry the digest covers the UTF-8 name, the dtype string, the shape and the
    C-order bytes, each length-prefixed, so renaming, reshaping or reordering changes it.
    """
    h = hashlib.sha256()
    for name, arr in state.items():
        a = np.ascontiguousarray(arr)
        for part in (name.encode("utf-8"), a.dtype.str.encode("ascii"), repr(tuple(a.shape)).encode("ascii")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        data = a.tobytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _model_cfg_from_dict(raw: Any, where: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise FedbratsError(f"{where}: model config must be a dict, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FedbratsError(f"{where}: unknown model config key(s): {', '.join(map(str, unknown))}")
    cfg = ModelConfig(**raw)
    try:
        init_filters_for(cfg)
    except FedbratsError as exc:
        raise FedbratsError(f"{where}: {exc}") from None
    return cfg


def _check_state_against(cfg: ModelConfig, state: Mapping[str, np.ndarray], where: str) -> None:
    """Names and shapes of ``state`` against the network ``cfg`` builds (on the meta device)."""
    with torch.device("meta"):
        net = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in _float_entries(net).items()}
    if list(state) != list(expected):
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        detail = (
            f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else "order differs"
        )
        raise FedbratsError(f"{where}: tensors do not match model {dataclasses.asdict(cfg)}: {detail}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise FedbratsError(
                f"{where}: tensor {k!r}: shape {tuple(state[k].shape)} does not match model "
                f"{dataclasses.asdict(cfg)} ({shape})"
            )


def save_model_file(
    path: str | Path,
    state: Mapping[str, np.ndarray],
    *,
    model_cfg: ModelConfig,
    labels: str,
    round: int,  # noqa: A002 - the protocol's word
    federation: str,
) -> Path:
    """Write a self-describing model file (format ``fedbrats-model/1``), atomically.

    Args:
        path: destination; parent folders are created; written via a temp file + rename so a
            reader never sees a half-written file.
        state: weights as from :func:`state_to_numpy` (stored as float32).
        model_cfg: the network the weights belong to.
        labels: BraTS label convention the model predicts for (``2021`` or ``2023``).
        round: federated round the weights come from (0 = initial model).
        federation: federation id.

    Returns:
        The path written.

    Raises:
        FedbratsError: invalid metadata, or ``state`` does not fit ``model_cfg`` (names the
            tensor), or the file cannot be written (names the file).
    """
    p = Path(path)
    where = f"model file {p}"
    if labels not in LABEL_CONVENTIONS:
        raise FedbratsError(f"{where}: labels must be one of {LABEL_CONVENTIONS}, got {labels!r}")
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise FedbratsError(f"{where}: round must be an integer >= 0, got {round!r}")
    if not isinstance(federation, str):
        raise FedbratsError(f"{where}: federation must be a string, got {type(federation).__name__}")
    if not isinstance(state, Mapping):
        raise FedbratsError(f"{where}: state must be a mapping of name -> array, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, arr in state.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            raise FedbratsError(f"{where}: tensor {name!r}: expected a numeric numpy array")
        arrays[str(name)] = np.ascontiguousarray(arr, dtype=np.float32)
    _model_cfg_from_dict(dataclasses.asdict(model_cfg), where)
    _check_state_against(model_cfg, arrays, where)
    payload = {
        "format": MODEL_FILE_FORMAT,
        "model": dataclasses.asdict(model_cfg),
        "labels": labels,
        "round": int(round),
        "federation": federation,
        "sha256": tensors_sha256(arrays),
        "tensors": {k: torch.from_numpy(v.copy()) for k, v in arrays.items()},
    }
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise FedbratsError(f"{where}: cannot write: {exc.strerror or exc}") from None
    return p


def read_model_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a model file without building the network.

    Returns:
        ``(state, meta)``: float32 arrays in stored order, and ``meta`` with keys ``format``,
        ``model_config`` (:class:`ModelConfig`), ``labels``, ``round``, ``federation``,
        ``sha256``, ``path``.

    Raises:
        FedbratsError: naming the file, when it is missing/unreadable, not a torch file, has
            another format tag, misses or mistypes a field, or its tensors fail the SHA-256.
    """
    p = Path(path)
    where = f"model file {p}"
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FedbratsError(f"{where}: no such file") from None
    except OSError as exc:
        raise FedbratsError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors
        # torch's own message suggests weights_only=False, which would execute code from the
        # file: never pass that advice on.
        raise FedbratsError(
            f"{where}: not a fedbrats model file (expected a file written by fedbrats, such as "
            f"final_model.pt; loading failed with {type(exc).__name__})"
        ) from None
    if not isinstance(raw, dict):
        raise FedbratsError(f"{where}: not a fedbrats model file (top level is {type(raw).__name__})")
    if raw.get("format") != MODEL_FILE_FORMAT:
        raise FedbratsError(
            f"{where}: format tag {raw.get('format')!r}, expected {MODEL_FILE_FORMAT!r}"
        )
    missing = [k for k in _META_KEYS if k not in raw]
    if missing:
        raise FedbratsError(f"{where}: missing field(s): {', '.join(missing)}")
    model_cfg = _model_cfg_from_dict(raw["model"], where)
    if raw["labels"] not in LABEL_CONVENTIONS:
        raise FedbratsError(f"{where}: labels {raw['labels']!r} not one of {LABEL_CONVENTIONS}")
    rnd = raw["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise FedbratsError(f"{where}: round must be an integer >= 0, got {rnd!r}")
    if not isinstance(raw["federation"], str) or not isinstance(raw["sha256"], str):
        raise FedbratsError(f"{where}: federation and sha256 must be strings")
    tensors = raw["tensors"]
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise FedbratsError(f"{where}: tensors must be a dict of name -> tensor")
    state = {k: np.ascontiguousarray(v.numpy()) for k, v in tensors.items()}
    digest = tensors_sha256(state)
    if digest != raw["sha256"]:
        raise FedbratsError(
            f"{where}: SHA-256 of the tensors is {digest}, the file says {raw['sha256']}: "
            "the file is corrupted or was modified"
        )
    _check_state_against(model_cfg, state, where)
    meta = {
        "format": raw["format"],
        "model_config": model_cfg,
        "labels": raw["labels"],
        "round": rnd,
        "federation": raw["federation"],
        "sha256": digest,
        "path": p,
    }
    return state, meta


def load_model_file(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model file written by :func:`save_model_file` and rebuild the network.

    Uses ``torch.load(..., weights_only=True)`` (no code is unpickled), checks the format tag,
    every field and the SHA-256 over the tensors.

    Returns:
        ``(model, meta)``: the SegResNet on the CPU in eval mode with the stored weights, and
        ``meta`` as :func:`read_model_file` describes (``model_config``, ``labels``, ``round``,
        ``federation``, ``sha256``, ``format``, ``path``).

    Raises:
        FedbratsError: naming the file, on any problem (see :func:`read_model_file`).
    """
    state, meta = read_model_file(path)
    model = build_model(meta["model_config"])
    try:
        load_numpy_state(model, state)
    except FedbratsError as exc:
        raise FedbratsError(f"model file {Path(path)}: {exc}") from None
    model.eval()
    return model, meta
