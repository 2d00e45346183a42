"""Local training and validation at a site.

One federated round at a site (Li et al. 2019, arXiv:1910.00962, Alg. 1): the node sets the
global weights into the model (:func:`node.model.load_numpy_state`), runs
``training.local_steps`` Adam steps on random patches of its own cases
(:meth:`LocalTrainer.train_round`), and the caller forms the update from
:func:`node.model.state_to_numpy`.  Validation (:func:`evaluate`) runs sliding-window
inference over whole held-out volumes and reports Dice and HD95 per region with MONAI metrics.

The loss is the soft Dice loss of Myronenko 2018 (arXiv:1810.11654, eq. 1: squared
denominators, sigmoid outputs, one term per region) as MONAI's :class:`~monai.losses.DiceLoss`
``(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)``, computed over the whole
batch (``batch=True``, see :func:`make_loss`).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.utils import set_determinism

from fedbrats.config import LABEL_CONVENTIONS, EvaluationConfig, TrainingConfig
from fedbrats.errors import FedbratsError
from node import data as node_data

CACHE_BUDGET_BYTES = 4 * 2**30
"""Most memory the training cache of one site may take; beyond it only a share is cached."""

REGION_KEYS = ("tc", "wt", "et")
"""Output channels / metric keys, in the network's channel order (``node.data.REGIONS``)."""


# ---------------------------------------------------------------------------------------------
# Process set-up


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (via :func:`monai.utils.set_determinism`).

    Also makes cuDNN deterministic (``deterministic=True``, ``benchmark=False``).  Call it
    before :func:`node.model.build_model` so every party builds identical initial weights.

    Args:
        seed: any integer; reduced modulo 2**32.
    """
    s = int(seed) % (2**32)
    random.seed(s)
    np.random.seed(s)
    set_determinism(seed=s)  # torch.manual_seed (+CUDA), cudnn.deterministic, benchmark off


def configure_torch(training: TrainingConfig) -> None:
    """Apply ``training.num_threads`` (torch intra-op CPU threads; 0 leaves torch's default)."""
    if training.num_threads > 0:
        torch.set_num_threads(int(training.num_threads))


def make_loss() -> torch.nn.Module:
    """The training loss: soft Dice over TC/WT/ET (Myronenko 2018, arXiv:1810.11654, eq. 1).

    ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5, batch=True)``:
    inputs are logits ``(B, 3, X, Y, Z)``, targets binary regions ``(B, 3, X, Y, Z)``.
    ``batch=True`` sums intersections over the whole batch before dividing, so a patch
    without tumour still penalises false positives through the batch's denominator instead of
    contributing a constant (and gradient-free) 1 per empty channel, which otherwise happens
    with ``smooth_nr=0``.

    Measured on bright-blob synthetic cases (cpu-small, 32^3 patches, batch 2, 120 steps):
    DiceFocal and DiceCE learned no faster than this loss; the learning rate matters more:
    Adam 5e-3 reached mean validation Dice ~0.9 after 80 steps, 2e-3 ~0.6 (~0.9 after 120),
    1e-2 plateaued near 0.6.
    """
    return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, batch=True)


def _round_seed(seed: int, round_index: int) -> int:
    """A 31-bit seed derived from (seed, round), so each round's data order is reproducible."""
    return int(np.random.SeedSequence([int(seed) % (2**32), int(round_index) % (2**32)]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainResult:
    """What one local round produced (the weights are read from the model).

    Attributes:
        steps: optimiser steps taken (``training.local_steps``).
        mean_loss: mean training loss over those steps (Dice loss, in [0, 1]).
        num_samples: number of training cases, the FedAvg weight.
        seconds: wall time of the round, s.
    """

    steps: int
    mean_loss: float
    num_samples: int
    seconds: float


def _collate_image_label(samples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``image`` (B, 4, *patch) and ``label`` (B, 3, *patch); other keys are dropped
    (the fg/bg index arrays the crop leaves behind differ in length between cases)."""
    return {
        key: torch.stack([torch.as_tensor(s[key], dtype=torch.float32) for s in samples])
        for key in ("image", "label")
    }


class LocalTrainer:
    """Runs local rounds of Adam on random patches of a site's training cases.

    The weights are set from outside before each round (``load_numpy_state`` copies into the
    existing parameters in place, so a kept optimiser stays attached to them).  Adam's moments
    are restarted at the start of every round when ``training.optimizer_restart`` is true (the
    "momentum restarting" of Li et al. 2019, arXiv:1910.00962); otherwise one Adam instance is
    kept for the trainer's lifetime and its moments carry over between rounds.

    Determinism: round ``r``'s patch order and augmentations depend only on ``(seed, r)``
    (the transforms' random state and the loader's shuffle generator are re-seeded at the
    start of every round), so a restarted node repeats a round exactly on the CPU; CUDA
    kernels may still be non-deterministic.

    Args:
        model: the network (moved to ``device`` here), outputs logits ``(B, 3, X, Y, Z)``.
        train_cases: dicts from :func:`node.data.load_case`, each with a ``label``; only
            ``image`` (4, X, Y, Z) and ``label`` (X, Y, Z, raw BraTS labels) are used.
        training: ``local_steps``, ``batch_size``, ``patch_size``, ``learning_rate``,
            ``optimizer_restart``.
        labels: label convention of the raw labels, ``2021`` or ``2023``.
        device: where to train.
        seed: site seed for data order and augmentation.

    Raises:
        FedbratsError: no training cases, a case without labels, or an unknown convention.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_cases: Sequence[Mapping[str, Any]],
        training: TrainingConfig,
        labels: str,
        device: torch.device | str,
        seed: int,
    ) -> None:
        if labels not in LABEL_CONVENTIONS:
            raise FedbratsError(f"labels: must be one of {LABEL_CONVENTIONS}, got {labels!r}")
        if not train_cases:
            raise FedbratsError("local training needs at least one training case, got none")
        items = []
        for i, case in enumerate(train_cases):
            cid = case.get("case_id", f"#{i}")
            if case.get("label") is None:
                raise FedbratsError(f"case {cid}: training case has no segmentation (label is None)")
            if case.get("image") is None:
                raise FedbratsError(f"case {cid}: training case has no image")
            items.append({"image": case["image"], "label": case["label"]})
        self.model = model
        self.training = training
        self.labels = labels
        self.device = torch.device(device)
        self.seed = int(seed)
        self.num_samples = len(items)
        self.model.to(self.device)
        self._transform = node_data.train_transforms(tuple(training.patch_size), labels=labels, seed=self.seed)
        # Cache the deterministic head of the pipeline (labels -> regions, pad, fg/bg indices,
        # z-score): ~27 bytes per voxel (float32 image, uint8 regions, int64 indices).
        total = sum(max(int(np.prod(np.shape(it["image"])[1:])), 1) * 27 for it in items)
        cache_rate = min(1.0, CACHE_BUDGET_BYTES / total)
        self._dataset = CacheDataset(
            data=items, transform=self._transform, cache_rate=cache_rate, num_workers=0, progress=False
        )
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)
        self._loader = DataLoader(
            self._dataset,
            batch_size=training.batch_size,
            shuffle=True,
            num_workers=0,
            generator=self._generator,
            drop_last=False,
            collate_fn=_collate_image_label,
        )
        self.loss_fn = make_loss()
        self.optimizer: torch.optim.Optimizer | None = None

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.training.learning_rate)

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Cycle through the loader forever (one reshuffle per pass)."""
        while True:
            for batch in self._loader:
                yield batch

    def train_round(
        self, round_index: int, on_step: Callable[[int, float], None] | None = None
    ) -> TrainResult:
        """Run exactly ``training.local_steps`` optimiser steps on the current weights.

        Args:
            round_index: federated round (seeds this round's data order and augmentation).
            on_step: called after each step as ``on_step(step, loss)`` with ``step`` counted
                from 1 to ``local_steps`` and ``loss`` the step's loss (float).

        Returns:
            :class:`TrainResult`; the trained weights are in ``self.model``.

        Raises:
            FedbratsError: the loss became NaN or infinite (names round and step).
        """
        start = time.perf_counter()
        rs = _round_seed(self.seed, round_index)
        if hasattr(self._transform, "set_random_state"):
            self._transform.set_random_state(seed=rs)
        self._generator.manual_seed(rs)
        if self.optimizer is None or self.training.optimizer_restart:
            self.optimizer = self._new_optimizer()
        self.model.train()
        batches = self._batches()
        losses: list[float] = []
        for step in range(1, self.training.local_steps + 1):
            batch = next(batches)
            image = torch.as_tensor(batch["image"]).to(self.device, torch.float32, non_blocking=True)
            target = torch.as_tensor(batch["label"]).to(self.device, torch.float32, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(image), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FedbratsError(
                    f"round {round_index}, step {step}: training loss is {value}; "
                    f"lower training.learning_rate (now {self.training.learning_rate})"
                )
            loss.backward()
            self.optimizer.step()
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
        return TrainResult(
            steps=len(losses),
            mean_loss=float(np.mean(losses)),
            num_samples=self.num_samples,
            seconds=time.perf_counter() - start,
        )


# ---------------------------------------------------------------------------------------------
# Validation


def spacing_from_affine(affine: Any) -> tuple[float, float, float]:
    """Voxel size (mm) along the array axes: the column norms of the affine's 3x3 block."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


@torch.inference_mode()
def predict_regions(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    evaluation: EvaluationConfig,
    *,
    device: torch.device | str,
) -> torch.Tensor:
    """Binary region masks of one normalised volume by sliding-window inference.

    Args:
        model: network mapping ``(B, 4, x, y, z)`` to logits ``(B, 3, x, y, z)``; moved to
            ``device`` (in place), used in eval mode and left in the mode it was in.
        image: ``(4, X, Y, Z)`` normalised image (as ``node.data.val_transforms`` makes it).
        evaluation: ``roi_size`` (voxels), ``overlap`` (fraction), ``threshold``
            (sigmoid probability).
        device: where to run the network.

    Returns:
        ``(3, X, Y, Z)`` bool tensor on the CPU: TC, WT, ET.
    """
    was_training = model.training
    dev = torch.device(device)
    model.to(dev)
    model.eval()
    try:
        x = torch.as_tensor(image, dtype=torch.float32)
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        x = x.unsqueeze(0).to(dev)
        logits = sliding_window_inference(
            x,
            roi_size=tuple(evaluation.roi_size),
            sw_batch_size=1,
            predictor=model,
            overlap=evaluation.overlap,
            mode="gaussian",
        )
        logits = torch.as_tensor(logits)
        if hasattr(logits, "as_tensor"):
            logits = logits.as_tensor()
        return (torch.sigmoid(logits[0].float()) > evaluation.threshold).cpu()
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    val_cases: Sequence[Mapping[str, Any]],
    evaluation: EvaluationConfig,
    *,
    labels: str,
    device: torch.device | str,
) -> dict[str, Any]:
    """Dice and HD95 per region over a site's validation cases.

    Each case is normalised with :func:`node.data.val_transforms`, segmented by
    :func:`predict_regions` (sliding window, sigmoid > threshold) and scored with MONAI's
    :class:`~monai.metrics.DiceMetric` and
    :class:`~monai.metrics.HausdorffDistanceMetric` ``(percentile=95)``.

    Conventions for empty regions (a case without enhancing tumour is common):

    * Dice: empty prediction and empty truth count as **1.0** (``ignore_empty=False``);
      a non-empty prediction of an empty truth counts as 0.0.
    * HD95: empty prediction and empty truth count as **0.0 mm**; exactly one of them empty
      leaves the distance undefined and the case is left out of that region's mean (its Dice
      already records the miss).  A region with no defined case reports ``None``.

    Args:
        model: the network, logits ``(B, 3, X, Y, Z)``; moved to ``device``, put in eval mode
            and restored to its previous mode after.
        val_cases: dicts from :func:`node.data.load_case` (``image`` (4, X, Y, Z), ``label``
            raw (X, Y, Z), ``affine`` (4, 4) used for the voxel size, ``case_id``).
        evaluation: sliding window and threshold settings.
        labels: label convention of the raw labels.
        device: where to run the network.

    Returns:
        ``{"tc", "wt", "et", "mean"}`` mean Dice in [0, 1] (``mean`` over the three regions),
        ``{"hd95_tc", "hd95_wt", "hd95_et", "hd95_mean"}`` mean HD95 in mm (float or None),
        and ``num_cases``.  All values are plain Python floats/ints/None (JSON-ready).

    Raises:
        FedbratsError: no cases, a case without labels, or an unknown label convention.
    """
    if labels not in LABEL_CONVENTIONS:
        raise FedbratsError(f"labels: must be one of {LABEL_CONVENTIONS}, got {labels!r}")
    if not val_cases:
        raise FedbratsError("evaluation needs at least one validation case, got none")
    transform = node_data.val_transforms(labels=labels)
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    dice_rows: list[np.ndarray] = []
    hd_rows: list[np.ndarray] = []
    for i, case in enumerate(val_cases):
        cid = case.get("case_id", f"#{i}")
        if case.get("label") is None:
            raise FedbratsError(f"case {cid}: validation case has no segmentation (label is None)")
        item = transform({"image": case["image"], "label": case["label"]})
        pred = predict_regions(model, item["image"], evaluation, device=device)[None]  # (1, 3, ...)
        truth = torch.as_tensor(item["label"])
        if hasattr(truth, "as_tensor"):
            truth = truth.as_tensor()
        truth = (truth > 0)[None].cpu()
        dice_rows.append(dice_metric(y_pred=pred, y=truth).numpy().reshape(-1))
        pred_any = pred.flatten(2).any(-1)[0].numpy()
        truth_any = truth.flatten(2).any(-1)[0].numpy()
        spacing = spacing_from_affine(case["affine"]) if case.get("affine") is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled below
            hd = hd_metric(y_pred=pred, y=truth, spacing=spacing).numpy().reshape(-1).astype(np.float64)
        hd = np.where(~pred_any & ~truth_any, 0.0, hd)
        hd = np.where(pred_any ^ truth_any, np.nan, hd)
        hd = np.where(np.isfinite(hd), hd, np.nan)
        hd_rows.append(hd)
    dice_metric.reset()
    hd_metric.reset()
    dice = np.nanmean(np.stack(dice_rows), axis=0)
    hd_all = np.stack(hd_rows)
    out: dict[str, Any] = {}
    for j, region in enumerate(REGION_KEYS):
        out[region] = float(dice[j])
    out["mean"] = float(np.mean(dice))
    hd_means: list[float] = []
    for j, region in enumerate(REGION_KEYS):
        col = hd_all[:, j]
        col = col[np.isfinite(col)]
        value = float(col.mean()) if col.size else None
        out[f"hd95_{region}"] = value
        if value is not None:
            hd_means.append(value)
    out["hd95_mean"] = float(np.mean(hd_means)) if hd_means else None
    out["num_cases"] = len(val_cases)
    return out
