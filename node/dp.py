"""Differential privacy at a site: DP-SGD model preparation, and DP filters on updates.

Two levels of protection (ARCHITECTURE §4):

**Sample level — DP-SGD** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016),
with Opacus.  Each step clips every per-sample gradient to L2 norm ≤ C (``dp.max_grad_norm``),
sums, adds N(0, σ²C²) per coordinate and divides by the expected batch size; batches are Poisson
samples of the site's training cases (rate q = B/N).  :class:`node.train.LocalTrainer` runs it;
this module supplies the model checks and wrapping:

* :func:`validate_model_for_dp` names what blocks per-sample gradients: BatchNorm (mixes samples;
  :func:`make_dp_compatible` can swap it for GroupNorm via Opacus' ``ModuleValidator.fix``),
  in-place activations and MONAI SegResNet's ``x += identity`` (they break Opacus' backward hooks
  in ``hooks``/``functorch`` mode: "Output 0 of BackwardHookFunction is a view and is being
  modified inplace"), and, for ``ew`` mode, layers PyTorch's ExpandedWeights cannot handle
  (PReLU, ConvTranspose — MONAI UNet).
* :func:`choose_grad_sample_mode`: ``ew`` (ExpandedWeights, ``torch.nn.utils._per_sample_grad``)
  when every trainable layer is a convolution, linear or group/instance/layer norm — it works on
  the *stock* SegResNet, in-place ops included, and is the fastest mode measured on CPU (see
  ``benchmarks/dp_bench.py``); otherwise ``hooks`` on a copy made DP-safe by
  :func:`make_dp_compatible` (Opacus falls back to functorch for layers without a grad sampler).
* :func:`wrap_for_dp` wraps a model exactly once (a second attempt raises).
* :func:`estimate_dp_memory` / :func:`check_dp_memory`: the memory DP-SGD needs (per-sample
  gradients ≈ B × parameters × 4 bytes, plus activations, weights, Adam state) against free
  memory, checked *before* training so that a site fails with "needed X GiB, free Y GiB"
  instead of dying mid-round.

**Site level — DP on updates**, as :class:`node.update.UpdateFilter` callables
``(round, delta) -> delta`` (never modifying their input):

* :func:`clip_update`: one global L2 clip over all tensors.
* :class:`SiteLocalGaussian` (``site-local``, DP without trusting anyone): clip to C, add
  N(0, σ²C²) per coordinate.
* :class:`SiteDistributedGaussian` (``site-distributed`` on float paths, e.g. CKKS): clip, add
  N(0, σ²C²/n) so that the *sum* of n sites carries N(0, σ²C²).
* Integer lattice (``mask`` mode): Skellam noise (Agarwal, Kairouz, Liu, "The Skellam Mechanism
  for Differentially Private Federated Learning", NeurIPS 2021) added *after* quantisation:
  :func:`integer_noise_variance`, :func:`distributed_skellam_noise`, :class:`SkellamNoiser`.
  Chosen over the distributed discrete Gaussian (Canonne, Kamath, Steinke NeurIPS 2020;
  Kairouz, Liu, Steinke ICML 2021) because sums of Skellam variables are Skellam (closed under
  summation, so the aggregate noise is exactly Sk(nμ, nμ)) and numpy's ``Generator.poisson`` is an
  exact sampler.

  *How quantisation and wraparound are accounted.*  (1) The site clips ‖Δ‖₂ ≤ C in float, then
  :func:`crypto.quantize.quantize` scales by ``scale = L/(2·clip)`` (``L = 2^bits − 1``) and
  rounds stochastically; rounding moves each coordinate by < 1, so the integer L2 sensitivity is
  Δ₂ ≤ C·scale + √d and Δ₁ ≤ √d·Δ₂ (:func:`skellam_sensitivity`; per-coordinate clipping only
  shrinks norms, and the constant offset ``clip`` cancels between neighbours because the number
  of contributions is public).  (2) Integer noise of variance ``σ²·(C·scale)²/n`` per site makes
  the aggregate Sk(μ, μ) with 2μ = σ²(C·scale)²; :func:`node.accounting.skellam_rdp` gives its
  RDP with the Δ₂, Δ₁ above (not a Gaussian approximation).  (3) Reduction modulo 2^m is
  post-processing of the integer sum, so it costs no privacy; it only threatens *utility*: the
  noisy total lies in [−B, W·L + B] and must be decoded in the centred representative, with B
  from :func:`integer_noise_headroom` included in the bit budget (see :class:`SkellamNoiser`).

* The paper's mechanisms (Li et al., "Privacy-preserving Federated Brain Tumour
  Segmentation", MLMI 2019, arXiv:1910.00962): :class:`PartialSharing` (largest fraction of |Δ|,
  Shokri & Shmatikov, "Privacy-Preserving Deep Learning", CCS 2015 — *not* DP by itself) and
  :class:`SparseVectorTechnique` (Li et al. Alg. 2 after Lyu, Su, Li, "Understanding the Sparse
  Vector Technique for Differential Privacy", VLDB 2017): pure ε-DP per round.

**Randomness.**  Noise comes from ``numpy.random.Generator(PCG64(seed))`` (:func:`make_rng`) with
a 256-bit seed drawn from ``os.urandom`` — by default afresh for every round, so no party can
predict a round's noise from earlier rounds or from the federation's public seed.  PCG64 is not a
cryptographically secure generator; seeding a fast statistical PRNG from the OS entropy pool per
release is the common practice of DP libraries (Opacus outside ``secure_mode``, TF Privacy,
Google's distributed-DP code) and is what the research literature assumes.  Floating-point
Gaussian/Laplace sampling is also subject to Mironov's (CCS 2012) precision attacks; the integer
Skellam path avoids them.  Never log raw updates, noise or patient data.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbrats.errors import FedbratsError
from fedbrats.masking import (  # shared with the aggregator, which sizes its decoding by them
    HEADROOM_FAILURE_PROB,
    integer_noise_headroom,
    integer_noise_variance,
)
from node.accounting import (
    PURE_STATE_FILE,
    SITE_STATE_FILE,
    AccountantStateError,
    PrivacyBudgetExceeded,
    PureDPAccountant,
    SiteLevelAccountant,
)

__all__ = [
    "DP_FILTER_MODES",
    "GRAD_SAMPLE_MODES",
    "DPMemoryError",
    "DPModelError",
    "DPSafeResBlock",
    "MemoryEstimate",
    "PartialSharing",
    "PrivacyBudgetExceeded",
    "SiteClip",
    "SiteDistributedGaussian",
    "SiteLocalGaussian",
    "SkellamNoiser",
    "SparseVectorTechnique",
    "check_dp_memory",
    "choose_grad_sample_mode",
    "clip_update",
    "distributed_skellam_noise",
    "dp_memory_breakdown",
    "estimate_dp_memory",
    "free_memory_bytes",
    "integer_noise_headroom",
    "integer_noise_variance",
    "is_dp_wrapped",
    "make_dp_compatible",
    "make_dp_filters",
    "make_rng",
    "skellam_sensitivity",
    "svt_epsilon_split",
    "validate_model_for_dp",
    "wrap_for_dp",
]

GRAD_SAMPLE_MODES = ("auto", "ew", "hooks", "functorch")
"""Per-sample gradient engines: ``ew`` (ExpandedWeights), ``hooks`` (Opacus grad samplers, functorch
fallback), ``functorch`` (vmap for every layer); ``auto`` = :func:`choose_grad_sample_mode`."""

DP_FILTER_MODES = ("site-local", "site-distributed", "svt", "partial")
"""``dp.mode`` entries that act on updates (``dp-sgd`` acts on training)."""

_GIB = float(2**30)

# Layers ExpandedWeights computes per-sample gradients of (torch.nn.utils._expanded_weights).
_EW_LAYERS: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_BATCHNORM: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
_WRAPPED_FLAG = "_fedbrats_dp_wrapped"


class DPModelError(FedbratsError):
    """The model cannot be trained with DP-SGD as it is (the message lists every problem)."""


class DPMemoryError(FedbratsError):
    """DP-SGD would need more memory than is free (the message says needed vs free, in GiB)."""


# ---------------------------------------------------------------------------------------------
# Model checks and wrapping


from monai.networks.blocks.segresnet_block import ResBlock as _MonaiResBlock  # noqa: E402


class DPSafeResBlock(_MonaiResBlock):
    """MONAI SegResNet ``ResBlock`` with ``x = x + identity`` instead of ``x += identity``.

    Same parameters, names and outputs; :func:`make_dp_compatible` swaps a block's class to this
    one so that Opacus' backward hooks see no in-place modification of a hooked output.
    """

    def forward(self, x):
        identity = x
        x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        return x + identity


def _resblock_classes() -> tuple[type, ...]:
    return (_MonaiResBlock,)


def _dp_safe_resblock_class() -> type | None:
    return DPSafeResBlock


def _has_own_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _inplace_problems(model: nn.Module) -> list[str]:
    out = []
    resblocks = _resblock_classes()
    for name, mod in model.named_modules():
        label = name or "<model>"
        if getattr(mod, "inplace", False) is True:
            out.append(f"{label}: {type(mod).__name__}(inplace=True) modifies its input in place, "
                       f"which breaks Opacus' backward hooks (make_dp_compatible sets inplace=False)")
        if resblocks and type(mod) in resblocks:
            out.append(f"{label}: {type(mod).__name__}.forward adds the skip connection in place "
                       f"(x += identity), which breaks Opacus' backward hooks "
                       f"(make_dp_compatible swaps in an out-of-place forward)")
    return out


def validate_model_for_dp(model: nn.Module, grad_sample_mode: str = "hooks") -> list[str]:
    """Name every module that blocks per-sample gradients (K03).

    Checks, each reported as ``"<module path>: <problem and fix>"``:

    * BatchNorm (any mode): it normalises over the batch, so one sample's gradient depends on the
      others and per-sample clipping bounds nothing; replace it with GroupNorm
      (:func:`make_dp_compatible` with ``replace_batchnorm=True``, Opacus ``ModuleValidator.fix``).
    * Other problems Opacus' ``ModuleValidator.validate`` reports (any mode).
    * ``hooks`` / ``functorch``: in-place activations (``inplace=True``) and MONAI SegResNet's
      ``ResBlock`` (``x += identity``), which break Opacus' backward hooks.
    * ``ew``: trainable layers ExpandedWeights cannot handle (e.g. PReLU, ConvTranspose3d of
      MONAI UNet) — use ``hooks`` for such models.

    Args:
        model: the network (not modified).
        grad_sample_mode: ``hooks`` (default, the strictest), ``functorch``, ``ew``, or ``auto``
            (the mode :func:`choose_grad_sample_mode` picks).

    Returns:
        Problems, one string each; empty when DP-SGD can run in that mode.

    Raises:
        FedbratsError: unknown ``grad_sample_mode``.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise FedbratsError(f"grad_sample_mode: must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    mode = choose_grad_sample_mode(model) if grad_sample_mode == "auto" else grad_sample_mode
    problems: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, _BATCHNORM):
            problems.append(f"{name or '<model>'}: {type(mod).__name__} mixes the samples of a batch "
                            f"and is not supported with DP-SGD; use GroupNorm "
                            f"(make_dp_compatible(model, replace_batchnorm=True))")
    try:
        from opacus.validators import ModuleValidator

        for err in ModuleValidator.validate(model, strict=False):
            text = str(err)
            if "BatchNorm" not in text:  # named above, per module
                problems.append(f"<opacus>: {text.splitlines()[0]}")
    except ImportError as exc:  # pragma: no cover - opacus is required for DP-SGD
        problems.append(f"<opacus>: cannot import opacus ({exc})")
    if mode in ("hooks", "functorch"):
        problems.extend(_inplace_problems(model))
    elif mode == "ew":
        for name, mod in model.named_modules():
            if _has_own_trainable(mod) and not isinstance(mod, _EW_LAYERS) and not isinstance(mod, _BATCHNORM):
                problems.append(f"{name or '<model>'}: {type(mod).__name__} has trainable parameters "
                                f"ExpandedWeights (grad_sample_mode='ew') cannot compute per-sample "
                                f"gradients of; use grad_sample_mode='hooks'")
    return problems


def choose_grad_sample_mode(model: nn.Module) -> str:
    """The fastest per-sample-gradient mode that works for ``model``.

    ``ew`` when every module with trainable parameters is a convolution, linear, embedding or
    group/layer/instance norm (the stock SegResNet: in-place ops are fine there); otherwise
    ``hooks`` (e.g. MONAI UNet's PReLU and ConvTranspose3d, computed through Opacus' functorch
    fallback), which needs :func:`make_dp_compatible` first.
    """
    for mod in model.modules():
        if _has_own_trainable(mod) and not isinstance(mod, _EW_LAYERS):
            return "hooks"
    return "ew"


def make_dp_compatible(model: nn.Module, *, replace_batchnorm: bool = False) -> nn.Module:
    """Remove what breaks Opacus' hooks, keeping weights and parameter names.

    In place on ``model``: every ``inplace=True`` module gets ``inplace=False``; every MONAI
    ``ResBlock`` gets an out-of-place forward (``x = x + identity``; the class is swapped for a
    subclass, state-dict keys are unchanged).  The outputs are identical.

    Args:
        model: the network.
        replace_batchnorm: also replace BatchNorm by GroupNorm with Opacus'
            ``ModuleValidator.fix`` — this returns a *new* module with different state-dict
            entries (BatchNorm's running statistics are gone), so every party of a federation
            must make the same change.

    Returns:
        ``model`` itself, or the fixed copy when BatchNorm was replaced.
    """
    safe_cls = _dp_safe_resblock_class()
    resblocks = _resblock_classes()
    for mod in model.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
        if safe_cls is not None and resblocks and type(mod) in resblocks:
            mod.__class__ = safe_cls
    if replace_batchnorm and any(isinstance(m, _BATCHNORM) for m in model.modules()):
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model


def is_dp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` was wrapped by :func:`wrap_for_dp` (or is an Opacus wrapper itself)."""
    try:
        from opacus.grad_sample import AbstractGradSampleModule
    except ImportError:  # pragma: no cover
        AbstractGradSampleModule = ()  # type: ignore[assignment]
    return bool(getattr(model, _WRAPPED_FLAG, False)) or isinstance(model, AbstractGradSampleModule) \
        or hasattr(model, "autograd_grad_sample_hooks")


def wrap_for_dp(model: nn.Module, grad_sample_mode: str = "auto") -> nn.Module:
    """Wrap ``model`` once for per-sample gradients (Opacus ``GradSampleModule`` family).

    The wrapper shares the model's parameters: train through the wrapper, read and set weights
    on ``model`` as before.  Per-sample gradients appear as ``p.grad_sample`` of shape
    ``(batch, *p.shape)`` after ``backward`` of a loss with ``mean`` reduction over the batch.

    Args:
        model: the network, already on its device and made compatible for hooks modes.
        grad_sample_mode: ``auto``, ``ew``, ``hooks`` or ``functorch``.

    Returns:
        The wrapper (``GradSampleModuleExpandedWeights`` for ``ew``, ``GradSampleModule`` else).

    Raises:
        DPModelError: ``model`` is already wrapped (the model is never wrapped twice: a second
            wrapper would compute every per-sample gradient twice, and a second accountant
            would under-count ε), or :func:`validate_model_for_dp` reports problems.
        FedbratsError: unknown mode.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise FedbratsError(f"grad_sample_mode: must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if is_dp_wrapped(model):
        raise DPModelError("model is already wrapped for DP-SGD (by another LocalTrainer or "
                           "make_private call); reuse that trainer instead of wrapping twice")
    mode = choose_grad_sample_mode(model) if grad_sample_mode == "auto" else grad_sample_mode
    problems = validate_model_for_dp(model, mode)
    if problems:
        raise DPModelError(f"model cannot be trained with DP-SGD (grad_sample_mode={mode!r}): "
                           f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    from opacus.grad_sample.utils import prepare_module

    wrapped = prepare_module(model, mode, batch_first=True, loss_reduction="mean")
    object.__setattr__(model, _WRAPPED_FLAG, True)
    object.__setattr__(wrapped, "fedbrats_grad_sample_mode", mode)
    return wrapped


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory a DP-SGD step needs vs what is free.

    Attributes:
        needed_bytes: estimated peak of one DP-SGD step (bytes).
        free_bytes: free memory on ``device`` (bytes), or -1 when unknown.
        device: ``cpu`` or ``cuda:N``.
        breakdown: bytes per component (weights, per_sample_grads, activations, ...).
    """

    needed_bytes: int
    free_bytes: int
    device: str
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """True when free memory is unknown or at least the need."""
        return self.free_bytes < 0 or self.needed_bytes <= self.free_bytes

    def __str__(self) -> str:
        free = "unknown" if self.free_bytes < 0 else f"{self.free_bytes / _GIB:.2f} GiB"
        return f"DP-SGD memory on {self.device}: needed {self.needed_bytes / _GIB:.2f} GiB, free {free}"


def _in_channels(model: nn.Module) -> int:
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(mod.in_channels)
    raise FedbratsError("estimate_dp_memory: cannot infer the input channels (no convolution); "
                        "pass in_channels")


def _activation_elements(model: nn.Module, in_channels: int, patch: tuple[int, ...]) -> int:
    """Elements of every leaf module's output for one sample, by a shape-only (meta) forward."""
    meta = copy.deepcopy(model).to("meta")
    total = 0

    def hook(_mod, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(torch.zeros((1, in_channels, *patch), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def estimate_dp_memory(model: nn.Module, batch_size: int, patch_size: Sequence[int], *,
                       in_channels: int | None = None, optimizer_slots: int = 2) -> int:
    """Estimated peak memory of one DP-SGD step, bytes (float32 training).

    needed = weights + gradient + summed/noised gradient buffers (3 × P × 4)
    + Adam state (``optimizer_slots`` × P × 4) + per-sample gradients (2 × B × P × 4: Opacus
    keeps ``grad_sample`` and a flattened copy while clipping) + activations (3 × B × A × 4: the
    outputs of every layer, A from a shape-only forward at ``patch_size``, kept for backward plus
    their gradients and temporaries) + the input and target patches.  P counts trainable
    parameters.  Deliberately conservative: for the demo SegResNet (batch 2, 48³) it gives
    541 MiB against a measured peak RSS increase of 250 MiB (``ew``), 329 MiB (``functorch``) and
    471 MiB (``hooks``) in ``benchmarks/dp_bench.py`` (non-private step: 224 MiB).

    Args:
        model: the network (not modified; a meta-device copy runs the shape-only forward).
        batch_size: samples per physical batch, B (the trainer splits larger Poisson batches).
        patch_size: spatial patch size, voxels.
        in_channels: input channels (default: the first convolution's).
        optimizer_slots: state tensors per parameter of the optimiser (Adam: 2).

    Returns:
        Bytes (int).

    Raises:
        FedbratsError: batch size < 1, empty patch, or the model cannot run on the patch.
    """
    return sum(dp_memory_breakdown(model, batch_size, patch_size, in_channels=in_channels,
                                   optimizer_slots=optimizer_slots).values())


def dp_memory_breakdown(model: nn.Module, batch_size: int, patch_size: Sequence[int], *,
                        in_channels: int | None = None, optimizer_slots: int = 2) -> dict[str, int]:
    """The components of :func:`estimate_dp_memory`, bytes each (same arguments)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise FedbratsError(f"training.batch_size: must be an integer >= 1, got {batch_size!r}")
    patch = tuple(int(s) for s in patch_size)
    if not patch or any(s < 1 for s in patch):
        raise FedbratsError(f"training.patch_size: must be positive sizes, got {tuple(patch_size)!r}")
    cin = int(in_channels) if in_channels else _in_channels(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    try:
        acts = _activation_elements(model, cin, patch)
    except Exception as exc:  # noqa: BLE001 - any shape error of a foreign model
        raise FedbratsError(f"estimate_dp_memory: the model cannot run on a {patch} patch with "
                            f"{cin} channels: {exc}") from exc
    f = 4
    breakdown = {
        "weights": n_all * f,
        "gradients": 3 * n_train * f,
        "optimizer_state": optimizer_slots * n_train * f,
        "per_sample_grads": 2 * batch_size * n_train * f,
        "activations": 3 * batch_size * acts * f,
        "inputs": 2 * batch_size * cin * int(np.prod(patch)) * f,
    }
    return {k: int(v) for k, v in breakdown.items()}


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def free_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``, bytes; -1 when it cannot be found.

    CUDA: ``torch.cuda.mem_get_info`` (free, from the driver).  CPU: ``psutil``'s available
    memory when psutil is installed, else ``MemAvailable`` from ``/proc/meminfo``; capped by the
    cgroup v2 limit minus usage when the process runs in a limited container.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    avail: int | None = None
    try:
        import psutil  # type: ignore[import-not-found]

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
        except OSError:
            avail = None
    cg = _cgroup_free()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return -1 if avail is None else int(avail)


def check_dp_memory(model: nn.Module, batch_size: int, patch_size: Sequence[int],
                    device: torch.device | str = "cpu", *, in_channels: int | None = None,
                    site: str = "") -> MemoryEstimate:
    """Estimate DP-SGD memory and compare it with free memory before training (K03).

    Returns:
        The :class:`MemoryEstimate` (log it with ``str()``).

    Raises:
        DPMemoryError: the estimate exceeds free memory: "needed X GiB, free Y GiB", with the
            largest components and what to lower.
    """
    breakdown = dp_memory_breakdown(model, batch_size, patch_size, in_channels=in_channels)
    needed = sum(breakdown.values())
    dev = torch.device(device)
    est = MemoryEstimate(needed, free_memory_bytes(dev), str(dev), breakdown)
    if not est.fits:
        who = f"site {site}: " if site else ""
        parts = ", ".join(f"{k} {v / _GIB:.2f} GiB" for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])[:3])
        raise DPMemoryError(
            f"{who}DP-SGD needs more memory than is free on {dev}: needed {needed / _GIB:.2f} GiB, "
            f"free {est.free_bytes / _GIB:.2f} GiB (largest: {parts}); lower training.batch_size "
            f"(now {batch_size}) or training.patch_size (now {tuple(patch_size)}), or use a smaller model"
        )
    return est


# ---------------------------------------------------------------------------------------------
# Randomness


def make_rng(seed: int | bytes | None = None) -> np.random.Generator:
    """``numpy.random.Generator(PCG64(seed))``; ``seed=None`` draws 256 bits from ``os.urandom``.

    PCG64 is a statistical, not a cryptographic, PRNG; see the module docstring for why an
    OS-entropy seed per round is the accepted practice for DP noise.
    """
    if seed is None:
        seed = os.urandom(32)
    if isinstance(seed, (bytes, bytearray)):
        seed = int.from_bytes(seed, "big")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise FedbratsError(f"rng seed: must be a non-negative integer or bytes, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def _round_rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else make_rng()


# ---------------------------------------------------------------------------------------------
# Site level: clipping and Gaussian noise


Tensors = Mapping[str, np.ndarray]


def _check_tensors(delta: Any, round: int, who: str) -> None:
    if not isinstance(delta, Mapping) or not delta:
        raise FedbratsError(f"round {round}: {who}: expected a non-empty mapping name -> array")
    for name, arr in delta.items():
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.floating):
            raise FedbratsError(f"round {round}: {who}: update tensor {name} is not floating point ({a.dtype})")
        if not np.all(np.isfinite(a)):
            raise FedbratsError(f"round {round}: {who}: update tensor {name} holds non-finite values")


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not ok or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise FedbratsError(f"{name}: must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def _count(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise FedbratsError(f"{name}: must be an integer >= 1, got {value!r}")
    return int(value)


def global_l2_norm(delta: Tensors) -> float:
    """‖Δ‖₂ over all tensors together (float64 accumulation)."""
    return math.sqrt(math.fsum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64)))
                               for a in (np.asarray(v) for v in delta.values())))


def clip_update(delta: Tensors, C: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so that ‖Δ‖₂ ≤ C (one global L2 norm over all tensors).

    Args:
        delta: update, name -> float array (not modified).
        C: clipping norm (> 0), weight units.

    Returns:
        ``(clipped, norm)``: float32 copies scaled by ``min(1, C/‖Δ‖₂)`` and the norm before
        clipping.

    Raises:
        FedbratsError: C not > 0, or the update is empty / non-finite.
    """
    c = _positive("site_clip", C)
    _check_tensors(delta, 0, "clip_update")
    norm = global_l2_norm(delta)
    factor = min(1.0, c / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in delta.items()}, norm


class _SiteLedgerMixin:
    """Optional site-level ledger: charged (and saved) once per released update."""

    accountant: SiteLevelAccountant | None
    state_path: Path | None

    def _setup_ledger(self, accountant: SiteLevelAccountant | None, state_path: str | os.PathLike | None,
                      site: str, delta: float | None, params: dict[str, Any]) -> None:
        self.state_path = Path(state_path) if state_path else None
        if accountant is None and self.state_path is not None:
            accountant = SiteLevelAccountant(site=site, delta=delta, params=params)
            if self.state_path.exists():
                accountant.load(self.state_path)
        elif accountant is not None and not accountant.params:
            accountant.params = params
        self.accountant = accountant

    def _charge(self, round: int, sigma: float, **info: Any) -> None:
        if self.accountant is None:
            return
        self.accountant.step(sigma, getattr(self, "site_sample_rate", 1.0))
        eps = self.accountant.epsilon() if self.accountant.delta else math.nan
        self.accountant.record_round(round, noise_multiplier=sigma, epsilon=eps, **info)
        if self.state_path is not None:
            self.accountant.save(self.state_path)


class SiteClip:
    """``site-distributed`` in ``mask`` mode: clip ‖Δ‖₂ ≤ C only; the integer noise is added after
    quantisation by :class:`SkellamNoiser` (the masking client must call it).

    Args:
        C: clipping norm (> 0), weight units.

    Attributes:
        last_norm: ‖Δ‖₂ of the last update before clipping; ``last_clipped``: whether it was
            scaled down.
    """

    name = "site-clip"

    def __init__(self, C: float) -> None:
        self.C = _positive("dp.site_clip", C)
        self.last_norm = math.nan
        self.last_clipped = False

    def __call__(self, round: int, delta: Tensors) -> dict[str, np.ndarray]:
        _check_tensors(delta, round, self.name)
        out, norm = clip_update(delta, self.C)
        self.last_norm, self.last_clipped = norm, norm > self.C
        return out


class SiteLocalGaussian(_SiteLedgerMixin):
    """``site-local``: clip ‖Δ‖₂ ≤ C, then add N(0, σ²C²) to every coordinate.

    Each site's update is itself (ε, δ)-DP w.r.t. the site's whole data (Gaussian mechanism with
    sensitivity C, noise multiplier σ; McMahan et al. ICLR 2018 for the client-level view); the
    aggregator needs no trust.

    Args:
        C: clipping norm (> 0), weight units (``dp.site_clip``).
        sigma: noise multiplier σ (> 0) (``dp.site_noise_multiplier``).
        rng: noise generator; None = a fresh :func:`make_rng` (os.urandom seed) every round.
        accountant: site-level ledger to charge per call (optional).
        state_path: where to persist that ledger (created and loaded when ``accountant`` is None).
        site: site id for the ledger.
        delta: δ of the site-level guarantee (``dp.site_delta``).
        site_sample_rate: fraction of sites taking part per round (1.0 = all; see
            :class:`node.accounting.SiteLevelAccountant`).

    Raises:
        FedbratsError: C or σ not > 0.
    """

    name = "site-local"

    def __init__(self, C: float, sigma: float, rng: np.random.Generator | None = None, *,
                 accountant: SiteLevelAccountant | None = None, state_path: str | os.PathLike | None = None,
                 site: str = "", delta: float | None = None, site_sample_rate: float = 1.0) -> None:
        self._setup_clip_noise(C, sigma, rng, site_sample_rate)
        self._setup_ledger(accountant, state_path, site, delta,
                           {"mode": self.name, "site_clip": self.C, "noise_multiplier": self.sigma,
                            "site_sample_rate": self.site_sample_rate})

    def _setup_clip_noise(self, C: float, sigma: float, rng: np.random.Generator | None,
                          site_sample_rate: float) -> None:
        self.C = _positive("dp.site_clip", C)
        self.sigma = _positive("dp.site_noise_multiplier", sigma)
        self.rng = rng
        self.site_sample_rate = float(site_sample_rate)
        self.last_norm = math.nan
        self.last_clipped = False

    def _charge_info(self) -> dict[str, Any]:
        return {"clip": self.C}

    @property
    def noise_std(self) -> float:
        """Per-coordinate noise standard deviation σC (weight units)."""
        return self.sigma * self.C

    def __call__(self, round: int, delta: Tensors) -> dict[str, np.ndarray]:
        _check_tensors(delta, round, self.name)
        clipped, norm = clip_update(delta, self.C)
        self.last_norm, self.last_clipped = norm, norm > self.C
        rng = _round_rng(self.rng)
        std = self.noise_std
        out = {k: (v + std * rng.standard_normal(v.shape, dtype=np.float32)).astype(np.float32)
               for k, v in clipped.items()}
        self._charge(round, self.sigma, **self._charge_info(), clipped=bool(self.last_clipped))
        return out


class SiteDistributedGaussian(SiteLocalGaussian):
    """``site-distributed`` on float aggregation paths (plaintext or CKKS sums): clip ‖Δ‖₂ ≤ C,
    add N(0, σ²C²/n) so that the sum of ``n_sites`` shares carries N(0, σ²C²).

    Only the *sum* is DP (sensitivity C, multiplier σ); a single site's share is not, so it needs
    secure aggregation.  If fewer than ``n_sites`` shares end up in the sum, its noise is only
    σ·√(m/n)·C: pass the fewest sites a round may be aggregated from (``federation.min_sites``),
    not the number of sites, to keep the guarantee when sites drop.  FedAvg weights scale the
    noise with the update; use equal weights (or weight-aware calibration) with this filter.

    Args:
        C: clipping norm (> 0), weight units.
        sigma: noise multiplier σ (> 0) of the sum.
        n_sites: number of shares the sum is guaranteed to contain (>= 1).
        rng, accountant, state_path, site, delta, site_sample_rate: as in :class:`SiteLocalGaussian`.
    """

    name = "site-distributed"

    def __init__(self, C: float, sigma: float, n_sites: int, rng: np.random.Generator | None = None, *,
                 accountant: SiteLevelAccountant | None = None, state_path: str | os.PathLike | None = None,
                 site: str = "", delta: float | None = None, site_sample_rate: float = 1.0) -> None:
        self._setup_clip_noise(C, sigma, rng, site_sample_rate)
        self.n_sites = _count("n_sites", n_sites)
        self._setup_ledger(accountant, state_path, site, delta,
                           {"mode": self.name, "site_clip": self.C, "noise_multiplier": self.sigma,
                            "n_sites": self.n_sites, "site_sample_rate": self.site_sample_rate})

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of one site's share, σC/√n (weight units)."""
        return self.sigma * self.C / math.sqrt(self.n_sites)

    def _charge_info(self) -> dict[str, Any]:
        return {"clip": self.C, "n_sites": self.n_sites}


# ---------------------------------------------------------------------------------------------
# Integer lattice (mask mode): Skellam


def skellam_sensitivity(C: float, scale: float, dim: int, *, max_weight: int = 1) -> tuple[float, float]:
    """(Δ₂, Δ₁) of one site's quantised contribution, integer units (for :func:`skellam_rdp`).

    Δ₂ = w·(C·scale + √d): stochastic rounding moves each of the d coordinates by < 1 (bounded
    deterministically, not only in expectation); Δ₁ ≤ √d · Δ₂ (Cauchy–Schwarz).
    """
    c = _positive("dp.site_clip", C)
    sc = _positive("scale", scale)
    d = _count("dim", dim)
    w = _count("max_weight", max_weight)
    d2 = w * (c * sc + math.sqrt(d))
    return d2, math.sqrt(d) * d2


def distributed_skellam_noise(shape: int | Sequence[int], *, variance_int: float,
                              rng: np.random.Generator | None = None) -> np.ndarray:
    """Symmetric Skellam noise Sk(μ, μ) = Poisson(μ) − Poisson(μ), μ = variance_int / 2.

    Sums of independent Skellam variables are Skellam, so n sites each adding
    ``variance_int`` give aggregate noise Sk(nμ, nμ) of variance n · ``variance_int``.

    Args:
        shape: output shape.
        variance_int: per-coordinate variance in integer units² (> 0), e.g. from
            :func:`integer_noise_variance`.
        rng: generator (default: fresh :func:`make_rng`).

    Returns:
        int64 array of ``shape``.
    """
    var = _positive("variance_int", variance_int)
    g = _round_rng(rng)
    mu = var / 2.0
    return (g.poisson(mu, size=shape).astype(np.int64) - g.poisson(mu, size=shape).astype(np.int64))


class SkellamNoiser:
    """Adds a site's Skellam share to its *quantised* update, modulo ``2**modulus_bits``.

    For ``site-distributed`` with ``federation.secure_aggregation = "mask"``: after
    :class:`SiteClip` (float L2 clip) and :func:`crypto.quantize.quantize` (weight 1), the masking
    client calls this on the integer vector before masking.  The aggregate (after the masks
    cancel) is ``Σ q_i + Sk(nμ, nμ)`` modulo 2^m; the aggregator decodes it in the centred
    representative (a total at or above ``2^m − B`` is negative) and the bit budget includes
    ``ceil(log2(2B+1))`` more bits, B = :meth:`headroom` with ``sites = federation.sites``
    (:func:`fedbrats.masking.quant_params` with the model dimension, the same figure).

    Args:
        C: float L2 clip (weight units); sigma: noise multiplier of the sum; n_sites: shares
            guaranteed in the sum (``federation.min_sites``).
        clip: per-coordinate quantisation range (``secagg.clip``); bits: quantisation bits.
        dim: number of coordinates of the update.
        rng: generator (default: fresh os.urandom seed per call).
        accountant, state_path, site, delta: site-level ledger charged with the Skellam RDP
            (:meth:`node.accounting.SiteLevelAccountant.step_skellam`).
    """

    name = "skellam"

    def __init__(self, C: float, sigma: float, n_sites: int, *, clip: float, bits: int, dim: int,
                 rng: np.random.Generator | None = None, accountant: SiteLevelAccountant | None = None,
                 state_path: str | os.PathLike | None = None, site: str = "",
                 delta: float | None = None) -> None:
        self.C = _positive("dp.site_clip", C)
        self.sigma = _positive("dp.site_noise_multiplier", sigma)
        self.n_sites = _count("n_sites", n_sites)
        self.clip = _positive("secagg.clip", clip)
        self.bits = _count("secagg.bits", bits)
        self.dim = _count("dim", dim)
        self.scale = ((1 << self.bits) - 1) / (2.0 * self.clip)
        self.variance_int = integer_noise_variance(self.C, self.sigma, self.n_sites, self.scale, dim=self.dim)
        self.rng = rng
        self.state_path = Path(state_path) if state_path else None
        if accountant is None and self.state_path is not None:
            accountant = SiteLevelAccountant(site=site, delta=delta)
            if self.state_path.exists():
                accountant.load(self.state_path)
        self.accountant = accountant
        if self.accountant is not None and not self.accountant.params:
            self.accountant.params = {"mode": "site-distributed/skellam", "site_clip": self.C,
                                      "noise_multiplier": self.sigma, "n_sites": self.n_sites,
                                      "scale": self.scale, "dim": self.dim}

    def headroom(self, sites: int | None = None, failure_prob: float = HEADROOM_FAILURE_PROB) -> int:
        """Tail bound B (integer units) of the noise in a sum of ``sites`` shares.

        P(the noise leaves ±B in any of the ``dim`` coordinates) ≤ ``failure_prob`` (a union
        bound over the coordinates of :func:`integer_noise_headroom`).  Pass ``sites`` =
        ``federation.sites``, the most shares a sum can hold (default ``n_sites``): with more
        shares than ``n_sites`` the noise grows.  With the federation's configuration this
        equals :func:`fedbrats.masking.skellam_headroom`, the figure the bit budget and the
        aggregator's centred decoding use.
        """
        n = self.n_sites if sites is None else _count("sites", sites)
        return integer_noise_headroom(self.variance_int * n, failure_prob / self.dim)

    def __call__(self, round: int, q: np.ndarray, *, modulus_bits: int) -> np.ndarray:
        """Return ``(q + noise) mod 2**modulus_bits`` in ``q``'s unsigned dtype.

        Raises:
            FedbratsError: ``q`` is not an unsigned integer array of ``dim`` values, or the
                modulus is not 32 / 64.
        """
        a = np.asarray(q)
        if a.dtype not in (np.uint32, np.uint64) or a.size != self.dim:
            raise FedbratsError(f"round {round}: skellam: expected {self.dim} uint32/uint64 values, "
                                f"got {a.size} of dtype {a.dtype}")
        if modulus_bits not in (32, 64):
            raise FedbratsError(f"round {round}: skellam: modulus_bits must be 32 or 64, got {modulus_bits!r}")
        noise = distributed_skellam_noise(a.shape, variance_int=self.variance_int, rng=_round_rng(self.rng))
        total = a.astype(np.uint64) + noise.view(np.uint64)  # two's complement: wraps mod 2^64
        if modulus_bits == 32:
            total &= np.uint64(0xFFFFFFFF)
        if self.accountant is not None:
            l2, l1 = skellam_sensitivity(self.C, self.scale, self.dim)
            self.accountant.step_skellam(l2, l1, self.variance_int * self.n_sites / 2.0)
            self.accountant.record_round(round, mechanism="skellam", noise_multiplier=self.sigma,
                                         epsilon=self.accountant.epsilon() if self.accountant.delta else math.nan)
            if self.state_path is not None:
                self.accountant.save(self.state_path)
        return total.astype(a.dtype)


# ---------------------------------------------------------------------------------------------
# The paper's mechanisms: partial sharing and the sparse vector technique


def _flatten(delta: Tensors) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...], int]]]:
    layout = []
    parts = []
    for k, v in delta.items():
        a = np.asarray(v)
        layout.append((k, a.shape, a.size))
        parts.append(a.ravel().astype(np.float64))
    return (np.concatenate(parts) if parts else np.zeros(0)), layout


def _unflatten(flat: np.ndarray, layout: list[tuple[str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k, shape, size in layout:
        out[k] = flat[start:start + size].reshape(shape).astype(np.float32)
        start += size
    return out


def _fraction(name: str, value: Any) -> float:
    f = _positive(name, value)
    if f > 1:
        raise FedbratsError(f"{name}: must lie in (0, 1], got {value!r}")
    return f


class PartialSharing:
    """``partial``: share only the largest ``fraction`` of |Δ| (global over all tensors), zero the
    rest (selective sharing of Shokri & Shmatikov, CCS 2015; Li et al. 2019 §2.3).

    Exactly ``k = ceil(fraction · K)`` coordinates are kept (ties broken by position).  The
    selection depends on the data, so this is *not* differentially private by itself; apply it
    after a noise filter (post-processing) when a guarantee is needed.

    Args:
        fraction: share of parameters kept, in (0, 1] (``dp.partial_fraction``).
    """

    name = "partial"

    def __init__(self, fraction: float) -> None:
        self.fraction = _fraction("dp.partial_fraction", fraction)
        self.last_kept = 0

    def __call__(self, round: int, delta: Tensors) -> dict[str, np.ndarray]:
        _check_tensors(delta, round, self.name)
        flat, layout = _flatten(delta)
        k = min(flat.size, int(math.ceil(self.fraction * flat.size - 1e-9)))
        out = np.zeros_like(flat)
        if k > 0:
            idx = np.argpartition(-np.abs(flat), k - 1, kind="introselect")[:k] if k < flat.size \
                else np.arange(flat.size)
            out[idx] = flat[idx]
        self.last_kept = k
        return _unflatten(out, layout)


def svt_epsilon_split(epsilon: float, c: int) -> tuple[float, float, float]:
    """Split a round's ε over the three noisy parts of Li et al.'s SVT.

    ε₁ (threshold) : ε₂ (queries) = 1 : (2c)^(2/3) (Lyu et al. 2017, §4.2, optimal for
    non-monotonic queries); the numeric answers spend ε₃ = ε₂ (Lap(cΔ/ε₃) = Lap(2cγ/ε₂)); so
    ε₁ = ε / (1 + 2(2c)^(2/3)) and ε₁ + ε₂ + ε₃ = ε.

    Returns:
        ``(eps1, eps2, eps3)``.
    """
    e = _positive("dp.svt_epsilon", epsilon)
    cc = _count("c", c)
    r = (2.0 * cc) ** (2.0 / 3.0)
    e1 = e / (1.0 + 2.0 * r)
    e2 = r * e1
    return e1, e2, e2


class SparseVectorTechnique:
    """``svt``: Li et al. 2019 (arXiv:1910.00962) Alg. 2 — selective sharing with the sparse
    vector technique of Lyu, Su, Li (VLDB 2017, Alg. 7 with numeric answers).

    Per round, over the flattened update of K coordinates, c = ceil(fraction · K):

    1. clip every coordinate to [−γ, γ]; queries ``|w_i|``; sensitivity Δ = 2γ;
    2. split ε (:func:`svt_epsilon_split`): ε₁ : ε₂ = 1 : (2c)^(2/3), ε₃ = ε₂;
    3. noisy threshold τ̂ = τ + Lap(Δ/ε₁) = τ + Lap(2γ/ε₁);
    4. visit coordinates in a uniformly random order (independent of the data); coordinate i
       is selected when ``|w_i| + Lap(2cΔ/ε₂) ≥ τ̂`` (Lap(4cγ/ε₂)); halt after c selections;
    5. release each selected value as ``clip(w_i + Lap(cΔ/ε₃), −γ, γ)`` (Lap(2cγ/ε₂)); every
       other coordinate is 0.

    The round is ε-DP (pure; Lyu et al. Thm. 4 plus ε₃ for the answers); rounds add up in
    :class:`node.accounting.PureDPAccountant`.  With large c the noise dwarfs γ: expect utility
    only for small c or large ε.

    Args:
        epsilon: ε per round (> 0) (``dp.svt_epsilon``).
        gamma: per-coordinate clip γ (> 0), weight units (``dp.svt_gamma``).
        tau: threshold τ (>= 0), weight units (``dp.svt_tau``).
        fraction: c / K in (0, 1] (``dp.svt_fraction``).
        rng: noise generator; None = fresh :func:`make_rng` per round.
        accountant: pure-DP ledger to charge (optional); state_path: where to persist it.
        site: site id; budget: refuse a release that would exceed this total ε (0 = none).

    Attributes:
        last_selected, last_c, last_split: counts and (ε₁, ε₂, ε₃) of the last round.
    """

    name = "svt"

    def __init__(self, epsilon: float, gamma: float, tau: float, fraction: float,
                 rng: np.random.Generator | None = None, *, accountant: PureDPAccountant | None = None,
                 state_path: str | os.PathLike | None = None, site: str = "", budget: float = 0.0) -> None:
        self.epsilon = _positive("dp.svt_epsilon", epsilon)
        self.gamma = _positive("dp.svt_gamma", gamma)
        self.tau = _positive("dp.svt_tau", tau, allow_zero=True)
        self.fraction = _fraction("dp.svt_fraction", fraction)
        self.rng = rng
        self.budget = _positive("budget", budget, allow_zero=True)
        self.site = site
        self.state_path = Path(state_path) if state_path else None
        params = {"epsilon_per_round": self.epsilon, "gamma": self.gamma, "tau": self.tau,
                  "fraction": self.fraction}
        if accountant is None and self.state_path is not None:
            accountant = PureDPAccountant(site=site, budget=self.budget, params=params)
            if self.state_path.exists():
                accountant.load(self.state_path)
        self.accountant = accountant
        self.last_selected = 0
        self.last_c = 0
        self.last_split: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    def __call__(self, round: int, delta: Tensors) -> dict[str, np.ndarray]:
        _check_tensors(delta, round, self.name)
        if self.accountant is not None and self.budget > 0:
            would = self.accountant.would_be_epsilon(self.epsilon)
            if would > self.budget:
                raise PrivacyBudgetExceeded(site=self.site, round=round, spent=self.accountant.epsilon(),
                                            would_be=would, budget=self.budget, delta=0.0, mechanism="pure-dp")
        flat, layout = _flatten(delta)
        K = flat.size
        c = max(1, min(K, int(math.ceil(self.fraction * K - 1e-9))))
        e1, e2, e3 = svt_epsilon_split(self.epsilon, c)
        sens = 2.0 * self.gamma
        rng = _round_rng(self.rng)
        clipped = np.clip(flat, -self.gamma, self.gamma)
        threshold = self.tau + rng.laplace(0.0, sens / e1)
        order = rng.permutation(K)
        nu = rng.laplace(0.0, 2.0 * c * sens / e2, size=K)
        above = np.abs(clipped[order]) + nu >= threshold
        selected = order[above][:c]  # the first c positives in the visiting order; then halt
        out = np.zeros(K, dtype=np.float64)
        if selected.size:
            noise = rng.laplace(0.0, c * sens / e3, size=selected.size)
            out[selected] = np.clip(clipped[selected] + noise, -self.gamma, self.gamma)
        self.last_selected, self.last_c, self.last_split = int(selected.size), c, (e1, e2, e3)
        if self.accountant is not None:
            self.accountant.step(self.epsilon, round=round)
            if self.state_path is not None:
                self.accountant.save(self.state_path)
        return _unflatten(out, layout)


# ---------------------------------------------------------------------------------------------
# Wiring


def make_dp_filters(cfg: Any, *, state_dir: str | os.PathLike | None = None, site: str | None = None,
                    n_sites: int | None = None, rng: np.random.Generator | None = None) -> list[Any]:
    """The update filters ``cfg.dp.mode`` asks for, in application order.

    Order: ``svt`` (its own ε-DP release), then ``site-local`` / ``site-distributed`` (clip and
    noise), then ``partial`` (post-processing of the noisy update).  ``dp-sgd`` is not a filter
    (see :class:`node.train.LocalTrainer`).

    * ``site-distributed`` needs secure aggregation: with ``mask`` it returns :class:`SiteClip`
      and the masking client must add :class:`SkellamNoiser` noise after quantisation; with a
      float aggregation (``ckks``) it returns :class:`SiteDistributedGaussian` with ``n_sites``
      (default ``federation.min_sites``).
    * Refused: ``site-distributed`` with ``secure_aggregation = "none"``; ``site-local`` together
      with ``site-distributed``; ``partial`` with ``site-distributed`` (selecting coordinates of
      one site's weakly-noised share would leak them).

    Args:
        cfg: a :class:`fedbrats.config.Config`.
        state_dir: where ledgers are persisted (default ``cfg.node.state_dir``; '' = none).
        site: site id (default ``cfg.node.site_id``).
        n_sites: shares guaranteed in a sum (default ``cfg.federation.min_sites``).
        rng: fixed generator (tests); default fresh os.urandom seeds per round.

    Raises:
        FedbratsError: unknown mode or a refused combination (names the field).
        AccountantStateError: a ledger in ``state_dir`` is damaged.
    """
    dp = cfg.dp
    modes = tuple(dp.mode)
    known = ("dp-sgd", "none", *DP_FILTER_MODES)
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise FedbratsError(f"dp.mode: unknown mechanism(s) {unknown} (known: {', '.join(known)})")
    site = cfg.node.site_id if site is None else site
    folder = cfg.node.state_dir if state_dir is None else state_dir
    base = Path(folder) if folder else None
    secure = cfg.federation.secure_aggregation
    if "site-local" in modes and "site-distributed" in modes:
        raise FedbratsError("dp.mode: choose one of 'site-local' and 'site-distributed', not both")
    if "site-distributed" in modes and secure == "none":
        raise FedbratsError("dp.mode: 'site-distributed' adds only a share of the noise to each update and "
                            "needs secure aggregation; federation.secure_aggregation is 'none' "
                            "(use 'mask' or 'ckks', or dp.mode 'site-local')")
    if "partial" in modes and "site-distributed" in modes:
        raise FedbratsError("dp.mode: 'partial' cannot follow 'site-distributed': selecting the largest "
                            "coordinates of one site's weakly-noised share would leak them")
    filters: list[Any] = []
    if "svt" in modes:
        filters.append(SparseVectorTechnique(
            dp.svt_epsilon, dp.svt_gamma, dp.svt_tau, dp.svt_fraction, rng, site=site,
            state_path=(base / PURE_STATE_FILE) if base else None))
    site_path = (base / SITE_STATE_FILE) if base else None
    if "site-local" in modes:
        filters.append(SiteLocalGaussian(dp.site_clip, dp.site_noise_multiplier, rng, site=site,
                                         delta=dp.site_delta, state_path=site_path))
    if "site-distributed" in modes:
        if secure == "mask":
            filters.append(SiteClip(dp.site_clip))
        else:
            n = cfg.federation.min_sites if n_sites is None else n_sites
            filters.append(SiteDistributedGaussian(dp.site_clip, dp.site_noise_multiplier, n, rng, site=site,
                                                   delta=dp.site_delta, state_path=site_path))
    if "partial" in modes:
        filters.append(PartialSharing(dp.partial_fraction))
    return filters


__all__ += ["AccountantStateError", "global_l2_norm"]
