"""Configuration: TOML files loaded into frozen dataclasses.

One schema serves every party.  A federation config (``configs/demo.toml``) holds all sections;
``fedbrats simulate`` derives one file per party from it (``aggregator.toml``,
``site-1.toml`` ...), each carrying only what that party needs.  The dataclass defaults *are*
the embedded default (demo) configuration; ``configs/demo.toml`` spells them out.

Loading reports every problem at once in one :class:`~fedbrats.errors.ConfigError` that names the
file and the dotted field (``training.local_steps: must be >= 1, got 0``).  Unknown keys are
errors too (a typo must not silently fall back to a default).  Secrets are never inline: later
sections reference key and certificate files by path.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedbrats.errors import ConfigError

def _path(default: str = "") -> Any:
    """A field holding a file path: relative paths resolve against the config file's folder."""
    return field(default=default, metadata={"path": True})


SECURE_AGGREGATION_MODES = ("none", "mask", "ckks")
SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
DROP_STAGES = ("training", "result", *SECAGG_STAGES)
DP_MECHANISMS = ("dp-sgd", "site-local", "site-distributed", "svt", "partial")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_MODES = ("none",)
LABEL_CONVENTIONS = ("2021", "2023")
MODEL_PRESETS = ("cpu-small", "paper")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FederationConfig:
    """What every party agrees on.

    Attributes:
        name: federation id; every request carries it and a mismatch is refused.
        rounds: number of federated rounds.
        sites: number of sites ``fedbrats simulate`` starts (site ids ``site-1``..``site-N``).
        min_sites: fewest updates a round may be aggregated from (after the round deadline).
        secure_aggregation: update protection: ``none`` (plaintext FedAvg) or ``mask``
            (pairwise masking, Bonawitz et al. CCS 2017; see :class:`SecAggConfig`).
        seed: master seed for data synthesis, splits, initial weights and augmentation.
    """

    name: str = "fedbrats-demo"
    rounds: int = 4
    sites: int = 3
    min_sites: int = 2
    secure_aggregation: str = "mask"
    seed: int = 0


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic BraTS data used when ``data.root`` is empty (see ``fedbrats data synth``).

    Attributes:
        cases_per_site: cases generated per site.
        spacing_mm: isotropic voxel size, mm.
        cache_dir: where synthesised data is cached between runs (``~`` expanded).
    """

    cases_per_site: int = 16
    spacing_mm: float = 2.0
    cache_dir: str = "~/.cache/fedbrats/synth"


@dataclass(frozen=True)
class DataConfig:
    """A site's BraTS data.

    Attributes:
        root: dataset folder (BraTS 2018–2021, FeTS 2022 or 2023+ layout); empty = synthetic.
            Like every path in a config file, a relative path is relative to the file's folder.
        partitioning: FeTS ``partitioning_*.csv`` (``Subject_ID``, ``Partition_ID``); empty =
            ``root/partitioning_1.csv`` if present, else per-site folders ``root/<site>/<case>``.
        labels: label convention, ``2021`` (0/1/2/4) or ``2023`` (0/1/2/3).
        val_fraction: share of each site's cases held out for validation.
        synth: synthetic data parameters.
    """

    root: str = _path()
    partitioning: str = _path()
    labels: str = "2021"
    val_fraction: float = 0.25
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass(frozen=True)
class ModelConfig:
    """The network: MONAI SegResNet (Myronenko 2018), 4 inputs, 3 sigmoid outputs TC/WT/ET.

    Attributes:
        preset: ``cpu-small`` (init_filters 8) or ``paper`` (init_filters 16, Li et al. 2019).
        init_filters: overrides the preset's number of first-level filters when > 0.
    """

    preset: str = "cpu-small"
    init_filters: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each site.

    Attributes:
        local_steps: optimiser steps per round.
        batch_size: patches per step.
        patch_size: training patch, voxels (x, y, z).
        learning_rate: Adam learning rate of round 1.
        final_learning_rate_ratio: the last round's (``federation.rounds``) learning rate as a
            fraction of ``learning_rate``, in (0, 1]; the rate decays geometrically in between,
            one value per round, and never rises.  1 keeps ``learning_rate`` in every round.
            Decaying to a third keeps the federation's result stable under 1e-7 perturbations
            of the aggregate (e.g. mask vs ckks rounding error), which a constant 3e-3 is not.
        optimizer_restart: restart Adam's moments every round (the paper's "momentum
            restarting"); false keeps them across rounds.
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.
        num_threads: torch CPU threads per node process; 0 = torch's default.
    """

    local_steps: int = 30
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (48, 48, 48)
    learning_rate: float = 3e-3
    final_learning_rate_ratio: float = 1 / 3
    optimizer_restart: bool = True
    device: str = "auto"
    num_threads: int = 1


@dataclass(frozen=True)
class EvaluationConfig:
    """Validation at each site on its held-out cases (sliding-window inference).

    Attributes:
        roi_size: sliding-window size, voxels.
        overlap: sliding-window overlap fraction.
        threshold: sigmoid probability above which a voxel is in a region.
    """

    roi_size: tuple[int, int, int] = (96, 112, 96)
    overlap: float = 0.25
    threshold: float = 0.5


@dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS material of one party (written by ``fedbrats provision``).

    Paths are relative to the config file's folder unless absolute.  Empty paths mean no TLS;
    then the daemons refuse to start unless run with ``--insecure``.

    Attributes:
        ca_cert: the federation CA certificate (PEM); peers must chain to it.
        cert: this party's certificate (PEM).
        key: this party's private key (PEM, file mode 0600).
        server_name: (node) name expected in the aggregator's certificate; empty = the host
            part of ``node.aggregator``.
    """

    ca_cert: str = _path()
    cert: str = _path()
    key: str = _path()
    server_name: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.ca_cert or self.cert or self.key)


@dataclass(frozen=True)
class AggregatorConfig:
    """The aggregator daemon.

    Attributes:
        host: address to listen on.
        port: TCP port; 0 picks a free one (written to ``out_dir/aggregator.port``).
        out_dir: checkpoints, ``metrics.jsonl``, final model (relative to the working
            directory).
        join_timeout_s: how long to wait for ``federation.sites`` to join once
            ``min_sites`` have (s).
        round_timeout_s: deadline for updates in one round, from the round's start (s).
        metrics_timeout_s: how long to wait for the last round's metrics (s).
        max_message_mb: gRPC message size limit, MiB (payloads are chunked at 1 MiB).
        allowed_sites: site ids that may join (their certificates' CN); empty = any site
            with a certificate from the federation CA.
        record_dir: threat-model experiments: keep everything the aggregator receives from
            each site (``<round>/<site>-<stage>.npz`` / ``.json``) in this folder; empty = off.
            Never set in production: it stores what sites sent.
        revoked_sites: site ids refused even with a valid certificate.
    """

    host: str = "127.0.0.1"
    port: int = 0
    out_dir: str = "runs/aggregator"
    join_timeout_s: float = 120.0
    round_timeout_s: float = 1800.0
    metrics_timeout_s: float = 600.0
    max_message_mb: int = 4
    allowed_sites: tuple[str, ...] = ()
    revoked_sites: tuple[str, ...] = ()
    record_dir: str = _path()


@dataclass(frozen=True)
class NodeConfig:
    """A site's node daemon.

    Attributes:
        site_id: this site's id (``site-1``); selects its cases from the dataset.
        aggregator: ``host:port`` of the aggregator.
        state_dir: where the site keeps its state (relative to the working directory).
        connect_timeout_s: how long to retry reaching the aggregator (s).
        identity_key: the site's Ed25519 identity private key (PEM, 0600), used to sign
            secure-aggregation key advertisements.
        identities_dir: folder of every site's Ed25519 identity *public* key
            (``<site>.pub``), to verify the other sites' key advertisements.
        drop_at: fault injection for experiments and tests: the node vanishes (exits without a
            word to the aggregator) when it reaches this stage; empty = never.
    """

    site_id: str = ""
    aggregator: str = "127.0.0.1:50051"
    state_dir: str = "runs/site"
    connect_timeout_s: float = 120.0
    identity_key: str = _path()
    identities_dir: str = _path()
    drop_at: str = ""


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation by pairwise masking (``federation.secure_aggregation = "mask"``).

    Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
    (CCS 2017), with the SecAgg+ neighbour graph of Bell et al. (CCS 2020).  Each site clips
    every coordinate of its update Δ to ``[-clip, clip]``, quantises it to ``bits`` bits with
    stochastic rounding, multiplies by its weight (training cases, ≤ ``max_weight``) and masks it
    modulo ``2**modulus_bits``; the aggregator learns only the weighted mean.

    Attributes:
        threshold: Shamir threshold t: fewest sites each stage needs, and the most colluding
            parties (aggregator plus t−1 sites) the protocol withstands is t−1 sites.
            0 = ``sites // 2 + 1``.
        neighbours: SecAgg+ graph degree k (even); 0 = every site masks with every other.
        clip: per-coordinate clipping range of the update (weights units); clipped values
            are counted and reported.
        bits: quantisation bits per value; step = 2·clip/(2^bits − 1).
        modulus_bits: 32 or 64; widened to 64 at set-up when the bit budget needs it.
        max_weight: largest FedAvg weight (training cases) a site may contribute.
        stage_timeout_s: deadline of the advertise-keys, share-keys and unmask stages (s); the
            masked-input stage uses ``aggregator.round_timeout_s`` (it includes training).
    """

    threshold: int = 0
    neighbours: int = 0
    clip: float = 0.25
    bits: int = 20
    modulus_bits: int = 32
    max_weight: int = 100
    stage_timeout_s: float = 120.0


@dataclass(frozen=True)
class CKKSConfig:
    """Homomorphic aggregation with CKKS (``federation.secure_aggregation = "ckks"``, TenSEAL).

    Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers"
    (ASIACRYPT 2017).  All sites share the secret key (as NVIDIA FLARE does); the aggregator holds
    a public context without it and only adds ciphertexts.

    Attributes:
        poly_modulus_degree: ring dimension N; each ciphertext packs N/2 values.
        coeff_mod_bit_sizes: bit sizes of the coefficient modulus primes.
        scale_bits: log2 of the encoding scale.
        max_abs_value: each coordinate of a site's update Δ is clipped to ±max_abs_value before
            encryption (clipped values are counted); with ``max_weight`` and the number of sites
            it sizes the precision and headroom check at provisioning.
        max_weight: largest FedAvg weight (training cases) a site may contribute.
        context: path of the serialized context from provisioning — the secret context in site
            kits (``ckks-secret.ctx``), the public one in the aggregator kit
            (``ckks-public.ctx``).

    The default chain (60, 40) is the shortest TenSEAL accepts: addition never rescales, so a
    ciphertext carries only the 60-bit prime (32 bytes per parameter on the wire).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 40
    max_abs_value: float = 1.0
    max_weight: int = 100
    context: str = _path()


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (Li et al. 2019, arXiv:1910.00962; Abadi et al. CCS 2016).

    Attributes:
        mode: mechanisms, combinable: ``dp-sgd`` (sample-level DP-SGD with Opacus),
            ``site-local`` (each site clips ‖Δ‖₂ ≤ site_clip and adds N(0, σ²C²)),
            ``site-distributed`` (each site adds a share so the *sum* carries σC; needs secure
            aggregation), ``svt`` (sparse vector technique), ``partial`` (share the largest
            fraction of |Δ|).  Empty = no DP.
        noise_multiplier: DP-SGD noise multiplier σ (0 = derive from target_epsilon).
        target_epsilon: DP-SGD target ε over all planned rounds (used when noise_multiplier
            is 0).
        delta: δ of the sample-level guarantee.
        max_grad_norm: DP-SGD per-sample gradient clipping norm C.
        accountant: ``rdp`` or ``prv``.
        epsilon_budget: a site refuses a round that would take its sample-level ε above this
            (0 = no budget).
        site_clip: site-level clipping norm C of ‖Δ‖₂.
        site_noise_multiplier: site-level noise multiplier σ.
        site_delta: δ of the site-level guarantee.
        svt_epsilon: SVT ε per round.
        svt_gamma: SVT per-parameter clipping γ.
        svt_tau: SVT threshold τ.
        svt_fraction: SVT fraction of parameters released per round (c / #parameters).
        partial_fraction: share of parameters (largest |Δ|) sent per round.
    """

    mode: tuple[str, ...] = ()
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    epsilon_budget: float = 0.0
    site_clip: float = 1.0
    site_noise_multiplier: float = 1.0
    site_delta: float = 1e-5
    svt_epsilon: float = 1.0
    svt_gamma: float = 1e-4
    svt_tau: float = 1e-4
    svt_fraction: float = 0.1
    partial_fraction: float = 0.1


@dataclass(frozen=True)
class Config:
    """A whole fedbrats configuration; see the section classes for each field."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    ckks: CKKSConfig = field(default_factory=CKKSConfig)
    dp: DPConfig = field(default_factory=DPConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _build(cls: type, raw: Any, path: str, problems: list[str], base: Path | None = None) -> Any:
    """Build dataclass ``cls`` from a TOML table, appending every problem to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{path or '<top>'}: expected a table, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            problems.append(f"{_join(path, key)}: unknown key (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        hint = hints[f.name]
        where = _join(path, f.name)
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, where, problems, base)
        else:
            ok, converted = _convert(hint, value)
            if ok and f.metadata.get("path") and converted and base is not None:
                converted = str((base / Path(converted).expanduser()).resolve())
            if ok:
                kwargs[f.name] = converted
            else:
                problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {args[0].__name__}s"
        return f"a list of {len(args)} {args[0].__name__}s"
    return getattr(hint, "__name__", str(hint))


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, list):
                return False, value
            conv = [_convert(args[0], v) for v in value]
            return all(ok for ok, _ in conv), tuple(c for _, c in conv)
        if not isinstance(value, list) or len(value) != len(args):
            return False, value
        out = []
        for a, v in zip(args, value):
            ok, c = _convert(a, v)
            if not ok:
                return False, value
            out.append(c)
        return True, tuple(out)
    return False, value


def _check_values(cfg: Config, problems: list[str]) -> None:
    """Range and choice checks (type checks happened while building)."""

    def need(cond: bool, where: str, msg: str) -> None:
        if not cond:
            problems.append(f"{where}: {msg}")

    fed = cfg.federation
    need(bool(fed.name.strip()), "federation.name", "must not be empty")
    need(fed.rounds >= 1, "federation.rounds", f"must be >= 1, got {fed.rounds}")
    need(fed.sites >= 1, "federation.sites", f"must be >= 1, got {fed.sites}")
    need(fed.min_sites >= 1, "federation.min_sites", f"must be >= 1, got {fed.min_sites}")
    need(
        fed.min_sites <= fed.sites,
        "federation.min_sites",
        f"must be <= federation.sites ({fed.sites}), got {fed.min_sites}",
    )
    need(
        fed.secure_aggregation in SECURE_AGGREGATION_MODES,
        "federation.secure_aggregation",
        f"must be one of {SECURE_AGGREGATION_MODES}, got {fed.secure_aggregation!r}",
    )
    data = cfg.data
    need(data.labels in LABEL_CONVENTIONS, "data.labels",
         f"must be one of {LABEL_CONVENTIONS}, got {data.labels!r}")
    need(0.0 <= data.val_fraction < 1.0, "data.val_fraction",
         f"must be in [0, 1), got {data.val_fraction}")
    need(data.synth.cases_per_site >= 2, "data.synth.cases_per_site",
         f"must be >= 2 (one to train, one to validate), got {data.synth.cases_per_site}")
    need(0.5 <= data.synth.spacing_mm <= 4.0, "data.synth.spacing_mm",
         f"must be in [0.5, 4] mm, got {data.synth.spacing_mm}")
    need(cfg.model.preset in MODEL_PRESETS, "model.preset",
         f"must be one of {MODEL_PRESETS}, got {cfg.model.preset!r}")
    need(cfg.model.init_filters >= 0, "model.init_filters",
         f"must be >= 0, got {cfg.model.init_filters}")
    tr = cfg.training
    need(tr.local_steps >= 1, "training.local_steps", f"must be >= 1, got {tr.local_steps}")
    need(tr.batch_size >= 1, "training.batch_size", f"must be >= 1, got {tr.batch_size}")
    need(all(p >= 16 and p % 8 == 0 for p in tr.patch_size), "training.patch_size",
         f"each side must be a multiple of 8 and >= 16 (SegResNet downsamples 3x), got {list(tr.patch_size)}")
    need(tr.learning_rate > 0, "training.learning_rate", f"must be > 0, got {tr.learning_rate}")
    need(0 < tr.final_learning_rate_ratio <= 1, "training.final_learning_rate_ratio",
         f"must be in (0, 1] (the last round's rate / learning_rate; 1 = constant), "
         f"got {tr.final_learning_rate_ratio}")
    need(tr.device in DEVICES, "training.device", f"must be one of {DEVICES}, got {tr.device!r}")
    need(tr.num_threads >= 0, "training.num_threads", f"must be >= 0, got {tr.num_threads}")
    ev = cfg.evaluation
    need(all(p >= 16 and p % 8 == 0 for p in ev.roi_size), "evaluation.roi_size",
         f"each side must be a multiple of 8 and >= 16, got {list(ev.roi_size)}")
    need(0.0 <= ev.overlap < 1.0, "evaluation.overlap", f"must be in [0, 1), got {ev.overlap}")
    need(0.0 < ev.threshold < 1.0, "evaluation.threshold", f"must be in (0, 1), got {ev.threshold}")
    ag = cfg.aggregator
    need(0 <= ag.port <= 65535, "aggregator.port", f"must be in [0, 65535], got {ag.port}")
    for name in ("join_timeout_s", "round_timeout_s", "metrics_timeout_s"):
        v = getattr(ag, name)
        need(v > 0, f"aggregator.{name}", f"must be > 0 s, got {v}")
    need(2 <= ag.max_message_mb <= 1024, "aggregator.max_message_mb",
         f"must be in [2, 1024] MiB (payloads stream in 1 MiB chunks), got {ag.max_message_mb}")
    for name in ("allowed_sites", "revoked_sites"):
        for site in getattr(ag, name):
            need(_valid_site_id(site), f"aggregator.{name}", f"invalid site id {site!r}")
    need(not cfg.node.site_id or _valid_site_id(cfg.node.site_id), "node.site_id",
         f"invalid site id {cfg.node.site_id!r} (letters, digits, '-', '_', '.', starting "
         f"with a letter or digit; not 'aggregator')")
    need(not cfg.node.drop_at or cfg.node.drop_at in DROP_STAGES, "node.drop_at",
         f"must be empty or one of {DROP_STAGES}, got {cfg.node.drop_at!r}")
    sa = cfg.secagg
    if fed.secure_aggregation == "mask":
        t = secagg_threshold(cfg)
        if fed.sites < 2:
            problems.append(f"federation.sites: secure_aggregation = 'mask' needs at least 2 "
                            f"sites, got {fed.sites} (use secure_aggregation = 'none')")
        else:
            need(2 <= t <= fed.sites, "secagg.threshold",
                 f"must be in [2, federation.sites = {fed.sites}] (0 = sites // 2 + 1), got {t}")
    need(sa.threshold >= 0, "secagg.threshold", f"must be >= 0, got {sa.threshold}")
    need(sa.neighbours == 0 or (sa.neighbours >= 2 and sa.neighbours % 2 == 0),
         "secagg.neighbours", f"must be 0 (complete graph) or an even number >= 2, got "
                              f"{sa.neighbours}")
    need(sa.clip > 0, "secagg.clip", f"must be > 0, got {sa.clip}")
    need(2 <= sa.bits <= 48, "secagg.bits", f"must be in [2, 48], got {sa.bits}")
    need(sa.modulus_bits in (32, 64), "secagg.modulus_bits", f"must be 32 or 64, got {sa.modulus_bits}")
    need(sa.max_weight >= 1, "secagg.max_weight", f"must be >= 1, got {sa.max_weight}")
    need(sa.stage_timeout_s > 0, "secagg.stage_timeout_s", f"must be > 0 s, got {sa.stage_timeout_s}")
    if fed.secure_aggregation == "mask" and not any(p.startswith("secagg.") for p in problems):
        from crypto.quantize import QuantParams, check_budget

        try:
            check_budget(QuantParams(clip=sa.clip, bits=sa.bits, modulus_bits=sa.modulus_bits,
                                     max_sites=fed.sites, max_weight=sa.max_weight), widen=True)
        except ConfigError as exc:
            problems.extend(f"secagg: {p}" for p in exc.problems)
    ck = cfg.ckks
    need(ck.max_abs_value > 0, "ckks.max_abs_value", f"must be > 0, got {ck.max_abs_value}")
    need(ck.max_weight >= 1, "ckks.max_weight", f"must be >= 1, got {ck.max_weight}")
    if fed.secure_aggregation == "ckks" and not any(p.startswith("ckks.") for p in problems):
        from crypto.ckks import CKKSParams, check_params

        try:
            check_params(CKKSParams(ck.poly_modulus_degree, tuple(ck.coeff_mod_bit_sizes),
                                    ck.scale_bits),
                         max_sites=fed.sites, max_abs_value=ck.max_abs_value,
                         max_weight=ck.max_weight)
        except ConfigError as exc:
            problems.extend(f"ckks: {p}" for p in exc.problems)
    dp = cfg.dp
    modes = tuple(dp.mode)
    bad = [m for m in modes if m not in DP_MECHANISMS]
    need(not bad, "dp.mode", f"unknown mechanism(s) {bad}; known: {', '.join(DP_MECHANISMS)}")
    need(len(set(modes)) == len(modes), "dp.mode", f"lists a mechanism twice: {list(modes)}")
    need(not ("site-local" in modes and "site-distributed" in modes), "dp.mode",
         "choose one of 'site-local' and 'site-distributed', not both")
    need(not ("site-distributed" in modes and fed.secure_aggregation == "none"), "dp.mode",
         "'site-distributed' adds only a share of the noise at each site and needs secure "
         "aggregation, but federation.secure_aggregation is 'none' (use 'mask' or 'ckks', or "
         "'site-local')")
    need(not ("partial" in modes and "site-distributed" in modes), "dp.mode",
         "'partial' cannot follow 'site-distributed' (selecting the largest coordinates of one "
         "site's weakly noised share would leak them)")
    need(dp.accountant in DP_ACCOUNTANTS, "dp.accountant",
         f"must be one of {DP_ACCOUNTANTS}, got {dp.accountant!r}")
    for name in ("noise_multiplier", "target_epsilon", "epsilon_budget"):
        need(getattr(dp, name) >= 0, f"dp.{name}", f"must be >= 0, got {getattr(dp, name)}")
    if "dp-sgd" in modes:
        need(dp.noise_multiplier > 0 or dp.target_epsilon > 0, "dp.noise_multiplier",
             "DP-SGD needs noise_multiplier > 0 or target_epsilon > 0")
    for name in ("max_grad_norm", "site_clip", "site_noise_multiplier", "svt_epsilon",
                 "svt_gamma"):
        need(getattr(dp, name) > 0, f"dp.{name}", f"must be > 0, got {getattr(dp, name)}")
    for name in ("delta", "site_delta"):
        need(0 < getattr(dp, name) < 1, f"dp.{name}", f"must be in (0, 1), got {getattr(dp, name)}")
    for name in ("svt_fraction", "partial_fraction"):
        need(0 < getattr(dp, name) <= 1, f"dp.{name}", f"must be in (0, 1], got {getattr(dp, name)}")
    need(cfg.node.connect_timeout_s > 0, "node.connect_timeout_s",
         f"must be > 0 s, got {cfg.node.connect_timeout_s}")


#: Names a site id may not take: the aggregator's CN and the folders of a provisioned federation.
RESERVED_IDS = ("aggregator", "ca", "identities")


def secagg_threshold(cfg: Config) -> int:
    """The effective Shamir threshold t (``secagg.threshold``, or ``sites // 2 + 1`` if 0)."""
    return cfg.secagg.threshold or cfg.federation.sites // 2 + 1


def _valid_site_id(site: str) -> bool:
    """Site ids: 1–64 of letters, digits, ``-``, ``_``, ``.``, starting with a letter or digit
    (so ``.`` and ``..`` are not ids: a site id names a folder); ``aggregator`` is reserved."""
    return (0 < len(site) <= 64 and site not in RESERVED_IDS and site[0].isascii()
            and site[0].isalnum()
            and all(c.isascii() and (c.isalnum() or c in "-_.") for c in site))


def config_from_dict(raw: dict, *, source: str = "<dict>", base: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping.

    Args:
        raw: the parsed TOML.
        source: named in errors (the file path).
        base: folder that relative file paths (TLS material, keys) resolve against.

    Raises:
        ConfigError: listing every problem, each naming the dotted field.
    """
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems, base)
    # Fields with a wrong type fell back to their defaults, so range checks still run and
    # every problem is reported in one error.
    _check_values(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path) -> Config:
    """Load a TOML config file.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or has invalid fields (all listed).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    return config_from_dict(raw, source=str(p), base=p.resolve().parent)


def with_overrides(cfg: Config, *, source: str = "", **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with fields replaced, re-validated: ``with_overrides(c, federation={"rounds": 2})``.

    Args:
        source: where ``cfg`` came from (e.g. its TOML path), named in errors.

    Raises:
        ConfigError: the result is invalid.
    """
    raw = to_dict(cfg)
    for section, values in sections.items():
        raw[section].update(values)
    where = f"{source} with command-line overrides" if source else \
        "the configuration with command-line overrides"
    return config_from_dict(raw, source=where)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists), as TOML would hold it."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def to_toml(cfg: Config) -> str:
    """Serialise a config to TOML text that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
        for k, v in subs.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(to_dict(cfg), "")
    return "\n".join(lines).lstrip("\n")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
