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

**DP-SGD** (Abadi et al., CCS 2016) when ``dp_cfg.mode`` contains ``"dp-sgd"``: every local step
is one Poisson sample of the site's training cases (each case independently with probability
q = batch_size / N, one random patch per selected case), per-sample gradients from Opacus
(:func:`node.dp.wrap_for_dp`, model wrapped exactly once), each clipped to L2 ≤ C, summed, plus
N(0, σ²C²), divided by the expected batch size, then Adam.  The loss is the *per-sample*
decomposable :func:`make_dp_loss` (the batch Dice of :func:`make_loss` couples samples, which
per-sample clipping cannot bound).  One :class:`node.accounting.SampleLevelAccountant` spans
all rounds, optimiser restarts and node restarts (its JSON ledger is reloaded), and a round that
would exceed ``dp_cfg.epsilon_budget`` is refused before it trains
(:class:`node.accounting.PrivacyBudgetExceeded`).
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.utils import set_determinism

from fedbrats.config import LABEL_CONVENTIONS, EvaluationConfig, TrainingConfig
from fedbrats.errors import FedbratsError
from node import data as node_data

if TYPE_CHECKING:  # imported lazily at run time: the non-private path never loads Opacus
    from fedbrats.config import DPConfig
    from node.accounting import SampleLevelAccountant
    from node.dp import MemoryEstimate

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


def make_dp_loss() -> torch.nn.Module:
    """The DP-SGD training loss: a mean over samples of *per-sample* losses.

    DP-SGD clips each sample's gradient, which bounds one case's influence only when the loss is
    a sum (or mean) of per-sample terms; :func:`make_loss`'s batch Dice is not.  Here: soft Dice
    per sample and region (``batch=False``, squared denominators, as Myronenko 2018) plus binary
    cross-entropy on the logits; the cross-entropy keeps a gradient on patches without tumour,
    whose per-sample Dice term is constant with ``smooth_nr=0``.  Inputs: logits and binary
    regions ``(B, 3, X, Y, Z)``; output: scalar.
    """
    return DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, batch=False,
                      reduction="mean")


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
        mean_loss: mean training loss over those steps (Dice loss, in [0, 1]; under DP-SGD the
            per-sample Dice + cross-entropy of :func:`make_dp_loss` over the non-empty Poisson
            batches, NaN if every batch of the round was empty).
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


def learning_rate_at(training: TrainingConfig, round_index: int, planned_rounds: int | None) -> float:
    """Adam's learning rate in round ``round_index`` (1-based) of ``planned_rounds``.

    Geometric decay from ``training.learning_rate`` (round 1) to
    ``learning_rate · training.final_learning_rate_ratio`` (round ``planned_rounds``):
    ``lr_r = lr_1 · ratio ** ((r − 1) / (planned_rounds − 1))``, held at the final value after
    the plan.  Constant ``learning_rate`` when the ratio is 1, when ``planned_rounds`` is None
    or 1, or for round indices below 1.  The ratio is validated to (0, 1] by the config loader,
    so the rate never rises.
    """
    lr, ratio = float(training.learning_rate), float(training.final_learning_rate_ratio)
    if ratio >= 1 or ratio <= 0 or not planned_rounds or planned_rounds <= 1 or round_index <= 1:
        return lr
    t = min(1.0, (round_index - 1) / (planned_rounds - 1))
    return lr * ratio ** t


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
        dp_cfg: :class:`fedbrats.config.DPConfig`; DP-SGD runs when its ``mode`` contains
            ``"dp-sgd"`` (``noise_multiplier`` σ — or 0 to derive σ from ``target_epsilon`` over
            ``planned_rounds × local_steps`` steps with Opacus' ``get_noise_multiplier`` —
            ``max_grad_norm`` C, ``delta``, ``accountant``, ``epsilon_budget``).  None = no DP.
        planned_rounds: rounds the federation plans (``federation.rounds``); needed only to derive σ.
        privacy_state: the sample-level ledger file (e.g. ``<state_dir>/dp_sample.json``): loaded
            at start when present (ε continues after a restart) and rewritten, atomically, when
            each round is charged.  None = in memory only (use :meth:`save_state`).
        site: site id, for messages and the ledger.
        grad_sample_mode: ``auto`` (:func:`node.dp.choose_grad_sample_mode`), ``ew``, ``hooks``
            or ``functorch``.
        noise_seed: seed of the DP noise and Poisson sampling; None (default) = 256 bits from
            ``os.urandom`` (they must be unpredictable; fix it only in tests).
        check_memory: estimate DP-SGD memory before training and refuse if it does not fit.

    Raises:
        FedbratsError: no training cases, a case without labels, or an unknown convention; an
            invalid DP field (named), batch size above the number of cases under DP-SGD.
        node.dp.DPModelError: (DP-SGD) unsupported modules (listed) or a model already wrapped.
        node.dp.DPMemoryError: (DP-SGD) needed memory exceeds free memory.
        node.accounting.AccountantStateError: (DP-SGD) the privacy ledger is damaged.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_cases: Sequence[Mapping[str, Any]],
        training: TrainingConfig,
        labels: str,
        device: torch.device | str,
        seed: int,
        *,
        dp_cfg: DPConfig | None = None,
        planned_rounds: int | None = None,
        privacy_state: str | os.PathLike | None = None,
        site: str = "",
        grad_sample_mode: str = "auto",
        noise_seed: int | None = None,
        check_memory: bool = True,
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
        self.planned_rounds = planned_rounds
        self.site = str(site)
        self._dp: _DPState | None = None
        if dp_cfg is not None and "dp-sgd" in tuple(dp_cfg.mode):
            self._dp = _setup_dp(self, dp_cfg, planned_rounds, privacy_state, grad_sample_mode,
                                 noise_seed, check_memory)

    # -- differential privacy ------------------------------------------------------------------

    @property
    def dp_enabled(self) -> bool:
        """Whether this trainer runs DP-SGD."""
        return self._dp is not None

    @property
    def accountant(self) -> SampleLevelAccountant | None:
        """The sample-level accountant spanning all rounds (None without DP-SGD)."""
        return None if self._dp is None else self._dp.accountant

    @property
    def noise_multiplier(self) -> float | None:
        """DP-SGD noise multiplier σ in use (None without DP-SGD)."""
        return None if self._dp is None else self._dp.sigma

    @property
    def sample_rate(self) -> float | None:
        """Poisson sampling rate q = batch_size / training cases (None without DP-SGD)."""
        return None if self._dp is None else self._dp.q

    @property
    def grad_sample_mode(self) -> str | None:
        """Opacus per-sample gradient mode in use (None without DP-SGD)."""
        return None if self._dp is None else self._dp.mode

    @property
    def memory_estimate(self) -> MemoryEstimate | None:
        """The DP-SGD memory estimate made before training (None without DP-SGD / check)."""
        return None if self._dp is None else self._dp.memory

    def privacy_spent(self) -> tuple[float, float]:
        """Sample-level ``(epsilon, delta)`` spent so far over all rounds.

        Without DP-SGD there is no guarantee: ``(inf, 0.0)``.
        """
        if self._dp is None:
            return math.inf, 0.0
        return self._dp.accountant.epsilon(self._dp.delta), self._dp.delta

    def would_be_epsilon(self, extra_rounds: int = 1) -> float:
        """ε after ``extra_rounds`` more rounds of ``training.local_steps`` steps (uncharged)."""
        if self._dp is None:
            return math.inf
        return self._dp.accountant.would_be_epsilon(
            int(extra_rounds) * self.training.local_steps, self._dp.delta,
            noise_multiplier=self._dp.sigma, sample_rate=self._dp.q)

    def save_state(self, path: str | os.PathLike | None = None) -> None:
        """Write the accountant's ledger (JSON, atomic) to ``path`` (default: ``privacy_state``).

        Raises:
            FedbratsError: DP-SGD is off, or no path given and none configured.
        """
        dp = self._require_dp("save_state")
        target = path if path is not None else dp.state_path
        if target is None:
            raise FedbratsError(f"site {self.site or '?'}: save_state: no path given and no privacy_state configured")
        dp.accountant.save(target)

    def load_state(self, path: str | os.PathLike | None = None) -> None:
        """Replace the accountant with the ledger at ``path`` (default: ``privacy_state``), so ε
        continues from what was spent before a restart.

        Raises:
            FedbratsError: DP-SGD is off or no path; FileNotFoundError: no such file;
            AccountantStateError: the ledger is damaged.
        """
        dp = self._require_dp("load_state")
        source = path if path is not None else dp.state_path
        if source is None:
            raise FedbratsError(f"site {self.site or '?'}: load_state: no path given and no privacy_state configured")
        dp.accountant.load(source)

    def _require_dp(self, what: str) -> _DPState:
        if self._dp is None:
            raise FedbratsError(f"site {self.site or '?'}: {what}: DP-SGD is not enabled (dp.mode lacks 'dp-sgd')")
        return self._dp

    def learning_rate(self, round_index: int) -> float:
        """Adam's learning rate in round ``round_index`` (see :func:`learning_rate_at`)."""
        return learning_rate_at(self.training, round_index, self.planned_rounds)

    def _set_learning_rate(self, round_index: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(round_index)

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
            PrivacyBudgetExceeded: (DP-SGD) the round would take ε above ``dp.epsilon_budget``;
                nothing was trained or charged.
        """
        if self._dp is not None:
            return self._train_round_dp(round_index, on_step)
        start = time.perf_counter()
        rs = _round_seed(self.seed, round_index)
        if hasattr(self._transform, "set_random_state"):
            self._transform.set_random_state(seed=rs)
        self._generator.manual_seed(rs)
        if self.optimizer is None or self.training.optimizer_restart:
            self.optimizer = self._new_optimizer()
        self._set_learning_rate(round_index)
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
                    f"lower training.learning_rate (now {self.learning_rate(round_index)} in this round)"
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

    def _new_dp_optimizer(self) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        dp = self._require_dp("optimizer")
        base = torch.optim.Adam(self.model.parameters(), lr=self.training.learning_rate)
        opt = DPOptimizer(base, noise_multiplier=dp.sigma, max_grad_norm=dp.max_grad_norm,
                          expected_batch_size=self.training.batch_size, loss_reduction="mean",
                          generator=dp.noise_generator)

        def count(_opt: Any) -> None:
            dp.steps_taken += 1

        opt.attach_step_hook(count)
        return opt

    def _train_round_dp(self, round_index: int, on_step: Callable[[int, float], None] | None) -> TrainResult:
        """One DP-SGD round: budget check, up-front charge, ``local_steps`` Poisson-sampled steps.

        The whole round is charged (and the ledger saved) *before* training: a crash mid-round
        over-counts ε (safe) and never under-counts it.  A Poisson batch larger than
        ``training.batch_size`` is processed in chunks of that size (per-sample gradients are
        clipped and accumulated, one noisy step); an empty batch still takes a step of pure
        noise, as the analysis assumes.  ``on_step`` gets NaN as the loss of an empty batch.
        """
        from node.accounting import PrivacyBudgetExceeded

        dp = self._require_dp("train_round")
        start = time.perf_counter()
        steps = int(self.training.local_steps)
        spent = dp.accountant.epsilon(dp.delta)
        would = dp.accountant.would_be_epsilon(steps, dp.delta, noise_multiplier=dp.sigma, sample_rate=dp.q)
        if dp.budget > 0 and would > dp.budget:
            raise PrivacyBudgetExceeded(site=self.site, round=round_index, spent=spent, would_be=would,
                                        budget=dp.budget, delta=dp.delta, mechanism="sample-level")
        dp.accountant.step(dp.sigma, dp.q, steps)
        dp.accountant.record_round(round_index, steps=steps, noise_multiplier=dp.sigma, sample_rate=dp.q,
                                   epsilon=would, delta=dp.delta)
        if dp.state_path is not None:
            dp.accountant.save(dp.state_path)

        rs = _round_seed(self.seed, round_index)
        if hasattr(self._transform, "set_random_state"):
            self._transform.set_random_state(seed=rs)
        if self.optimizer is None or self.training.optimizer_restart:
            self.optimizer = self._new_dp_optimizer()
        self._set_learning_rate(round_index)
        opt = self.optimizer
        self.model.train()
        n, chunk_size = self.num_samples, max(1, int(self.training.batch_size))
        losses: list[float] = []
        for step in range(1, steps + 1):
            picked = np.flatnonzero(dp.rng.random(n) < dp.q)
            opt.zero_grad(set_to_none=True)
            if picked.size == 0:
                for p in dp.params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                opt.step()
                value = math.nan
            else:
                chunks = [picked[i:i + chunk_size] for i in range(0, picked.size, chunk_size)]
                total = 0.0
                for k, chunk in enumerate(chunks):
                    batch = _collate_image_label([self._dataset[int(i)] for i in chunk])
                    image = batch["image"].to(self.device, torch.float32, non_blocking=True)
                    target = batch["label"].to(self.device, torch.float32, non_blocking=True)
                    loss = dp.loss_fn(dp.module(image), target)
                    v = float(loss.detach())
                    if not math.isfinite(v):
                        raise FedbratsError(
                            f"site {self.site or '?'}: round {round_index}, step {step}: training loss is {v}; "
                            f"lower training.learning_rate (now {self.learning_rate(round_index)} in this round)"
                        )
                    loss.backward()
                    total += v * len(chunk)
                    if k < len(chunks) - 1:  # clip and accumulate this chunk; one noisy step at the end
                        opt.signal_skip_step(do_skip=True)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                opt.step()
                value = total / picked.size
                losses.append(value)
            if on_step is not None:
                on_step(step, value)
        return TrainResult(
            steps=steps,
            mean_loss=float(np.mean(losses)) if losses else math.nan,
            num_samples=self.num_samples,
            seconds=time.perf_counter() - start,
        )


@dataclass
class _DPState:
    """DP-SGD state of one trainer (see :func:`_setup_dp`)."""

    module: torch.nn.Module
    mode: str
    params: list[torch.nn.Parameter]
    sigma: float
    q: float
    max_grad_norm: float
    delta: float
    budget: float
    accountant: Any
    state_path: Path | None
    rng: np.random.Generator
    noise_generator: torch.Generator
    loss_fn: torch.nn.Module
    memory: Any
    steps_taken: int = 0


def _dp_number(name: str, value: Any, *, low: float, low_open: bool, high: float | None = None,
               high_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    v = float(value) if ok else math.nan
    bad = not ok or (v <= low if low_open else v < low) or (high is not None and (v >= high if high_open else v > high))
    if bad:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
        raise FedbratsError(f"dp.{name}: must be a finite number {lo}{hi}, got {value!r}")
    return v


def _setup_dp(trainer: LocalTrainer, dp_cfg: DPConfig, planned_rounds: int | None,
              privacy_state: str | os.PathLike | None, grad_sample_mode: str, noise_seed: int | None,
              check_memory: bool) -> _DPState:
    """Validate the DP config, check and wrap the model once, build or restore the accountant."""
    from node import dp as node_dp
    from node.accounting import ACCOUNTANT_MECHANISMS, SampleLevelAccountant

    where = f"site {trainer.site}: " if trainer.site else ""
    C = _dp_number("max_grad_norm", dp_cfg.max_grad_norm, low=0, low_open=True)
    delta = _dp_number("delta", dp_cfg.delta, low=0, low_open=True, high=1)
    budget = _dp_number("epsilon_budget", dp_cfg.epsilon_budget, low=0, low_open=False)
    sigma = _dp_number("noise_multiplier", dp_cfg.noise_multiplier, low=0, low_open=False)
    if dp_cfg.accountant not in ACCOUNTANT_MECHANISMS:
        raise FedbratsError(f"dp.accountant: must be one of {ACCOUNTANT_MECHANISMS}, got {dp_cfg.accountant!r}")
    B, N, steps = int(trainer.training.batch_size), trainer.num_samples, int(trainer.training.local_steps)
    if B > N:
        raise FedbratsError(f"{where}DP-SGD samples each case with probability q = batch_size / cases; "
                            f"training.batch_size = {B} exceeds the site's {N} training case(s)")
    q = B / N
    if sigma == 0:
        target = _dp_number("target_epsilon", dp_cfg.target_epsilon, low=0, low_open=True)
        if not isinstance(planned_rounds, int) or isinstance(planned_rounds, bool) or planned_rounds < 1:
            raise FedbratsError(f"{where}dp.noise_multiplier = 0 derives σ from dp.target_epsilon over the "
                                f"planned rounds; pass planned_rounds (federation.rounds), got {planned_rounds!r}")
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha"
                sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                                   steps=planned_rounds * steps, accountant=dp_cfg.accountant))
        except ValueError as exc:
            raise FedbratsError(f"{where}dp.target_epsilon = {target:g} is unreachable for q = {q:.4g} over "
                                f"{planned_rounds * steps} steps (δ = {delta:g}): {exc}") from exc
    if grad_sample_mode not in node_dp.GRAD_SAMPLE_MODES:
        raise FedbratsError(f"grad_sample_mode: must be one of {node_dp.GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")

    model = trainer.model
    if node_dp.is_dp_wrapped(model):
        raise node_dp.DPModelError(f"{where}the model is already wrapped for DP-SGD by another trainer; "
                                   f"a model is never wrapped twice (reuse that LocalTrainer)")
    mode = node_dp.choose_grad_sample_mode(model) if grad_sample_mode == "auto" else grad_sample_mode
    if mode != "ew":
        node_dp.make_dp_compatible(model)  # in place: same weights and names
    problems = node_dp.validate_model_for_dp(model, mode)
    if problems:
        raise node_dp.DPModelError(f"{where}the model cannot be trained with DP-SGD (grad_sample_mode={mode!r}): "
                                   f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    memory = None
    if check_memory:
        memory = node_dp.check_dp_memory(model, B, tuple(trainer.training.patch_size), trainer.device,
                                         site=trainer.site)
    module = node_dp.wrap_for_dp(model, mode)

    params = {"max_grad_norm": C, "batch_size": B, "num_cases": N, "local_steps": steps,
              "noise_multiplier": sigma, "sample_rate": q, "grad_sample_mode": mode}
    accountant = SampleLevelAccountant(dp_cfg.accountant, site=trainer.site, delta=delta, budget=budget,
                                       params=params)
    state_path = Path(privacy_state) if privacy_state else None
    if state_path is not None and state_path.exists():
        accountant.load(state_path)  # ε continues from the ledger ...
        accountant.budget, accountant.params = budget, params  # ... under today's configuration
    secret = int(noise_seed) if noise_seed is not None else int.from_bytes(os.urandom(32), "big")
    rng = np.random.Generator(np.random.PCG64(secret))
    gen = torch.Generator(device=trainer.device)
    gen.manual_seed(int(np.random.SeedSequence(secret).generate_state(1, np.uint64)[0] >> 1))
    return _DPState(module=module, mode=mode, params=[p for p in model.parameters() if p.requires_grad],
                    sigma=sigma, q=q, max_grad_norm=C, delta=delta, budget=budget, accountant=accountant,
                    state_path=state_path, rng=rng, noise_generator=gen, loss_fn=make_dp_loss(), memory=memory)


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
