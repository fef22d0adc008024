"""Typed run configuration: YAML -> frozen dataclasses, `--set` overrides, validation.

A config travels as plain data (``Config.to_dict()``) from the CLI to every Ray worker, which rebuilds
it with ``Config.from_dict``. Every user mistake becomes a ``ConfigError`` that names the key and the
file, so the launcher can print one line and stop before any worker starts.
"""
from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user mistake in a config: printed as one line, never with a traceback."""

    def __init__(self, key: str, message: str, source: str = "<config>"):
        self.key, self.message, self.source = key, message, source
        super().__init__(f"{source}: {key}: {message}")

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.key, self.message, source)


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    """Run name; the run directory is <output_dir>/<name>. Relaunching a name resumes it."""
    output_dir: str = "runs"
    """Folder that holds run directories: a local or shared path, or a bucket (s3://, gs://), which every
    process writes through a local staging folder (pipeline/run_mirror.py); multi-node runs need one of the
    two shared kinds."""
    seed: int = 0
    """Seed for model init, augmentation and shard order."""
    log_every_steps: int = 10
    """Interval of metrics.jsonl rows and the console progress line."""
    trackers: tuple[str, ...] = ("tensorboard",)
    """Experiment trackers fed by rank 0 with every metrics.jsonl row (pipeline/reporting/trackers.py):
    any of tensorboard, wandb (WANDB_* variables; WANDB_MODE=offline works without a network), mlflow
    (MLFLOW_TRACKING_URI chooses the server). A tracker that cannot start is a one-line warning."""
    profile_steps: tuple[int, ...] = ()
    """[first, last]: torch.profiler over these optimizer steps (inclusive) on rank 0, written to
    <run>/profile/ (Chrome trace, top operators, host syncs per step; pipeline/profiling.py). Empty: off."""
    inject_failure_at_step: Optional[int] = None
    """Fault drill: the last rank exits abruptly (os._exit) at this step, once per run directory."""
    inject_failure_in_checkpoint: bool = False
    """Fault drill: the exit happens after that step's checkpoint shards are written, before meta.json."""


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    """Training shards: a folder with manifest.json, a glob, a brace pattern, or several joined by '::'."""
    val: str = ""
    """Validation shards (same forms as train); empty disables validation."""
    sample_corpus: Optional[str] = None
    """Name of a built-in sample corpus ('digits') written on first use when train/val are missing."""
    batch_size_per_rank: int = 64
    """Micro-batch per rank per step (DeepSpeed's train_micro_batch_size_per_gpu)."""
    global_batch_size: Optional[int] = None
    """Optional check: must equal batch_size_per_rank x accumulation x ranks when given."""
    num_workers_per_rank: int = 2
    """DataLoader worker processes per rank."""
    image_size_px: int = 224
    """Training crop size in pixels."""
    val_image_size_px: Optional[int] = None
    """Validation crop size (defaults to image_size_px); ResNet strikes back A3 trains 160, tests 224."""
    val_crop_pct: float = 0.875
    """Validation resize = crop / crop_pct, then centre crop (timm's convention)."""
    shuffle_buffer: int = 1000
    """Positions per shuffle window: each window of the epoch's (block-ordered) samples is permuted.
    Nothing is held in memory but the window's permutation; it matters when shuffle_block > 1."""
    shuffle_block: int = 1
    """Consecutive samples that stay together in the epoch's seeded block order. 1 (the default): every
    position is a uniformly drawn sample, however the shards were written (class by class, say).
    Larger blocks keep reads within runs of this many consecutive samples (storage where seeks cost)
    and mix only when a shuffle window holds many blocks: launch warns when it cannot."""
    rrc_scale_min: float = 0.08
    """Lower bound of RandomResizedCrop's area scale."""
    hflip_prob: float = 0.5
    interpolation: str = "bilinear"
    """Resize filter of crops: 'bilinear' (timm's default) or 'bicubic' (open_clip's)."""
    fast_decode: bool = True
    """Training decode straight to uint8 crops (reduced-size JPEG decode, one resize, normalised on the
    device) when the augmentation is crop + flip only; colour jitter or RandAugment use timm's PIL path."""
    color_jitter: float = 0.0
    randaugment: Optional[str] = None
    """timm auto-augment string, e.g. 'rand-m6-mstd0.5-inc1' (RSB A3); null disables."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_classes: Optional[int] = None
    """Defaults to the training manifest's num_classes."""
    train_weights: Optional[tuple[float, ...]] = None
    """Sampling weight per '::'-separated training source (mixing several corpora); null = by size."""


@dataclass(frozen=True)
class ModelSection:
    kind: str = "classifier"
    """Model family (pipeline.families): 'classifier' (timm residual networks) or 'clip' (open_clip CLIP/SigLIP)."""
    name: str = "resnet50"
    """Registered name (pipeline.models), any timm model name, or (clip) any open_clip model name."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate."""
    zero_init_last: bool = True
    """Zero-init the last norm of each residual block (Goyal et al.; timm's default)."""
    pretrained_path: Optional[str] = None
    """Optional local weights file to initialise from (safe loading, no pickled code)."""
    grad_checkpointing: bool = False
    channels_last: bool = False
    """Feed NHWC batches (weights stay NCHW under DeepSpeed, see docs)."""
    compile: bool = False
    """torch.compile the model in place (nn.Module.compile, so checkpoint keys stay plain) before DeepSpeed
    wraps it; the loss, mixup and the contrastive gather stay eager. Off by default: the first steps pay the
    compile (minutes for a ResNet-50), which only long GPU runs win back."""
    compile_mode: Optional[str] = None
    """torch.compile mode: null (default), 'reduce-overhead' or 'max-autotune'."""


@dataclass(frozen=True)
class ContrastiveSection:
    """CLIP / SigLIP options (model.kind: clip)."""

    loss: str = "clip"
    """'clip' (symmetric InfoNCE, learnable temperature) or 'siglip' (sigmoid, learnable bias); the values the
    family accepts (pipeline.families.clip)."""
    local_loss: bool = False
    """open_clip's local loss: each rank scores its own images against all texts (less memory)."""
    gather_with_grad: bool = True
    """Gather features across ranks with gradients, so the loss covers the global batch exactly."""
    lock_image: bool = False
    """LiT: freeze the image tower."""
    lock_image_unlocked_groups: int = 0
    """Leave the last N layer groups of a locked image tower trainable."""
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    """Matryoshka representation learning (Kusupati et al. 2022): the loss is also taken over these nested
    prefixes of the embedding (each renormalised), so embeddings can be truncated to any of them. Empty =
    off; the full embedding width is always included."""
    matryoshka_weights: Optional[tuple[float, ...]] = None
    """One weight per matryoshka_dims entry (the full width keeps weight 1); null = 1 for every prefix."""


@dataclass(frozen=True)
class DistillSection:
    """Knowledge distillation (launch distill): a frozen teacher, the student is `model`."""

    teacher: str = ""
    """Teacher REF: a run dir, a checkpoint dir, an exported file, or open_clip/timm weights (+ teacher_model)."""
    teacher_model: Optional[str] = None
    """Architecture name for outside weight files (open_clip or timm name)."""
    temperature: float = 1.0
    """Softmax temperature of the KL term (scaled by T^2, Hinton et al.)."""
    distill_weight: float = 1.0
    """Weight of KL(teacher || student)."""
    hard_label_weight: float = 0.0
    """Weight of the student's own loss on the labels (alpha); 0 = pure function matching."""
    zeroshot_classes: str = ""
    """CLIP teacher -> classifier student: a CLIP_benchmark-layout folder (classnames.txt, templates);
    empty = the training manifest's class names with the 80 OpenAI ImageNet templates."""


@dataclass(frozen=True)
class OptimSection:
    name: str = "sgd"
    """'sgd', 'adamw' or 'lamb'."""
    lr: float = 0.1
    """Peak learning rate (after warmup)."""
    weight_decay: float = 1e-4
    """Applied to weights only: norms and biases are excluded."""
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = None
    """Global gradient norm clip (DeepSpeed gradient_clipping); null disables. LAMB clips at min(this, 1.0):
    timm's Lamb clips the global norm at 1.0 itself."""
    loss: str = "ce"
    """'ce' (softmax cross-entropy) or 'bce' (sigmoid, as ResNet strikes back)."""
    bce_target_threshold: Optional[float] = None
    """loss 'bce' only: targets above this become 1, the rest 0, after mixup/cutmix (timm's
    BinaryCrossEntropy(target_threshold=...); ResNet strikes back uses 0.2); null keeps soft targets."""
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None
    """Weight EMA decay per step (e.g. 0.9998); null disables."""


@dataclass(frozen=True)
class ScheduleSection:
    epochs: float = 1.0
    """Length of training in epochs of the training set."""
    kind: str = "cosine"
    """'cosine' or 'step'."""
    warmup_epochs: float = 0.0
    """Linear warmup from warmup_lr_ratio x lr."""
    warmup_lr_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak lr."""
    step_epochs: tuple[int, ...] = (30, 60, 80)
    step_gamma: float = 0.1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (tests, benchmarks); null = epochs decide."""


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32', 'bf16' or 'fp16'."""
    gradient_accumulation_steps: int = 1
    comm_dtype: str = "fp32"
    """Gradient all-reduce dtype under bf16 autocast. 'fp32' (default) reduces fp32 gradients, as timm and
    open_clip do with DDP + AMP; 'bf16' opts in to DeepSpeed's default of reducing Linear/Conv gradients in
    bf16 (half the bytes, rounding error that grows with the number of ranks)."""
    extra: dict = field(default_factory=dict)
    """Raw keys merged into the generated DeepSpeed JSON (advanced)."""


@dataclass(frozen=True)
class RaySection:
    num_workers: int = 2
    """Training ranks (Ray Train workers)."""
    use_gpu: Optional[bool] = None
    """null = use GPUs when the cluster has them."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    """Worker-group restarts from the latest checkpoint (Ray Train FailureConfig)."""
    storage_path: Optional[str] = None
    """Where Ray Train keeps its own run state (a local path, or s3:// / gs:// through pyarrow); defaults to
    the run directory (in the bucket for a run in one). Checkpoints and metrics always go to run.output_dir."""
    torch_threads_per_worker: Optional[int] = None
    """Intra-op threads per rank; defaults to cpus_per_worker."""
    cudnn_benchmark: bool = True
    """GPU: let cuDNN pick the fastest convolution algorithms for the (fixed) input shapes, as timm and
    open_clip_train do."""
    tf32_matmul: bool = True
    """GPU: fp32 matmuls and convolutions may use TF32 tensor cores (open_clip_train's default); only the
    fp32 parts of an autocast step are affected."""


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept (the newest complete one is never deleted)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0 = none)."""
    resume: bool = True
    """Resume from the run directory's latest complete checkpoint when there is one."""
    preempt_grace_s: float = 120.0
    """After SIGTERM, how long `launch pretrain` waits for the ranks to finish their step and write the
    preemption checkpoint before it exits anyway (the latest complete checkpoint then stays the resume point).
    Keep it under the platform's notice (spot VMs: 30-120 s; Kubernetes: terminationGracePeriodSeconds)."""


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 0
    """Validate every N steps (0 = only at the end)."""
    at_end: bool = True
    batch_size_per_rank: Optional[int] = None
    """Defaults to data.batch_size_per_rank."""
    zeroshot: tuple[str, ...] = ()
    """Zero-shot sets (CLIP_benchmark webdataset layout) evaluated with the validation (CLIP models)."""
    async_: bool = False
    """YAML key `async`. Evaluate each complete checkpoint in a separate Ray actor while training goes on
    (data.val and eval.zeroshot, as `launch eval` would); results are logged at the checkpoint's step."""
    async_num_cpus: float = 1.0
    """CPUs reserved for the asynchronous evaluation actor."""
    async_num_gpus: float = 0.0
    """GPUs reserved for the asynchronous evaluation actor (0 = evaluate on the CPU)."""


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "optim": OptimSection,
    "contrastive": ContrastiveSection,
    "distill": DistillSection,
    "schedule": ScheduleSection,
    "deepspeed": DeepSpeedSection,
    "ray": RaySection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
}


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)
    distill: DistillSection = field(default_factory=DistillSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    ray: RaySection = field(default_factory=RaySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>") -> "Config":
        try:
            if not isinstance(raw, dict):
                raise ConfigError("<root>", f"expected a mapping of sections, got {type(raw).__name__}")
            unknown = sorted(set(raw) - set(SECTIONS))
            if unknown:
                raise ConfigError(unknown[0], f"unknown section (valid: {', '.join(SECTIONS)})")
            sections = {name: _build_section(SECTIONS[name], raw.get(name) or {}, name) for name in SECTIONS}
            config = cls(**sections)
            validate(config)
            return config
        except ConfigError as err:
            raise err.with_source(source) from None

    def to_dict(self) -> dict:
        return {section: {_yaml_key(k): v for k, v in values.items()}
                for section, values in dataclasses.asdict(self).items()}

    @property
    def run_url(self) -> str:
        """Where the run directory lives: <output_dir>/<name>, a local path or an s3:// / gs:// URL."""
        from pipeline import storage

        return storage.join(self.run.output_dir, self.run.name)

    @property
    def run_dir(self) -> Path:
        """Where this process reads and writes the run directory: the directory itself, or for a run in a
        bucket its local staging folder, which pipeline.run_mirror mirrors to run_url."""
        from pipeline import storage

        if storage.is_remote(self.run.output_dir):
            return storage.staging_dir(self.run_url)
        return Path(self.run.output_dir) / self.run.name


# Keys that are Python keywords live in fields with a trailing underscore (eval.async -> async_).
# to_dict() writes the YAML spelling, so a config travels and dumps as users write it.
def _yaml_key(field_name: str) -> str:
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _build_section(cls: type, raw: Any, section: str):
    if not isinstance(raw, dict):
        raise ConfigError(section, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f.name): f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{section}.{key}", f"unknown key (valid: {', '.join(sorted(fields))})")
        values[fields[key]] = _coerce(value, hints[fields[key]], f"{section}.{key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type hint; the only conversions are int->float and list->tuple."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, errors[0] if errors else f"invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {hint} for {key}")


# model.kind and contrastive.loss are not here: the valid values are the model families' (registered in
# pipeline.families, a layer above this one), checked by pipeline.families.check_config.
_CHOICES = {
    "data.interpolation": ("bilinear", "bicubic"),
    "optim.name": ("sgd", "adamw", "lamb"),
    "optim.loss": ("ce", "bce"),
    "schedule.kind": ("cosine", "step"),
    "deepspeed.precision": ("auto", "fp32", "bf16", "fp16"),
    "deepspeed.comm_dtype": ("fp32", "bf16"),
    "model.compile_mode": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.sample_corpus": ("digits", None),
}
TRACKERS = ("tensorboard", "wandb", "mlflow")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express and that hold for every model family. What depends on the
    family (model.kind itself, contrastive.loss, eval.zeroshot) is pipeline.families.check_config's; paths are
    checked by the launcher's preflight."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            valid = ", ".join(repr(c) if c is None else c for c in choices)
            raise ConfigError(key, f"must be one of {valid}, got {value!r}")

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(key, message)

    if cfg.data.train_weights is not None:
        sources = len([p for p in cfg.data.train.split("::") if p.strip()])
        check(len(cfg.data.train_weights) == sources, "data.train_weights",
              f"needs one weight per '::' source ({sources}), got {len(cfg.data.train_weights)}")
        check(all(w > 0 for w in cfg.data.train_weights), "data.train_weights", "weights must be > 0")
    check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty name without '/'")
    check(cfg.run.log_every_steps >= 1, "run.log_every_steps", "must be >= 1")
    check(cfg.data.batch_size_per_rank >= 1, "data.batch_size_per_rank", "must be >= 1")
    check(cfg.data.num_workers_per_rank >= 0, "data.num_workers_per_rank", "must be >= 0")
    check(cfg.data.image_size_px >= 8, "data.image_size_px", "must be >= 8")
    check(0 < cfg.data.rrc_scale_min <= 1, "data.rrc_scale_min", "must be in (0, 1]")
    check(0 < cfg.data.val_crop_pct <= 1, "data.val_crop_pct", "must be in (0, 1]")
    check(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    check(cfg.data.shuffle_block >= 1, "data.shuffle_block", "must be >= 1")
    check(cfg.data.mixup_alpha >= 0, "data.mixup_alpha", "must be >= 0")
    check(cfg.data.cutmix_alpha >= 0, "data.cutmix_alpha", "must be >= 0")
    mixing = cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0
    check(not mixing or cfg.data.batch_size_per_rank % 2 == 0, "data.batch_size_per_rank",
          "mixup/cutmix pair samples within a batch: use an even batch size")
    check(cfg.data.num_classes is None or cfg.data.num_classes >= 2, "data.num_classes", "must be >= 2")
    check(bool(cfg.data.train) or cfg.data.sample_corpus is not None, "data.train", "is required")
    check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean", "mean and std need 3 values")
    check(0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
    check(cfg.distill.temperature > 0, "distill.temperature", "must be > 0")
    check(cfg.distill.distill_weight >= 0 and cfg.distill.hard_label_weight >= 0, "distill.distill_weight",
          "distill_weight and hard_label_weight must be >= 0")
    check(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
    threshold = cfg.optim.bce_target_threshold
    check(threshold is None or cfg.optim.loss == "bce", "optim.bce_target_threshold",
          "applies to optim.loss: bce only (set it to null for cross-entropy)")
    check(threshold is None or 0 <= threshold < 1, "optim.bce_target_threshold", f"must be in [0, 1), got {threshold}")
    check(cfg.optim.grad_clip_norm is None or cfg.optim.grad_clip_norm > 0, "optim.grad_clip_norm", "must be > 0")
    check(cfg.optim.ema_decay is None or 0 < cfg.optim.ema_decay < 1, "optim.ema_decay", "must be in (0, 1)")
    check(all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", "each must be in [0, 1)")
    check(cfg.schedule.epochs > 0, "schedule.epochs", "must be > 0")
    check(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    check(cfg.schedule.warmup_epochs < cfg.schedule.epochs, "schedule.warmup_epochs", "must be < schedule.epochs")
    check(cfg.schedule.max_steps is None or cfg.schedule.max_steps >= 1, "schedule.max_steps", "must be >= 1")
    check(0 <= cfg.deepspeed.zero_stage <= 3, "deepspeed.zero_stage", f"must be 0-3, got {cfg.deepspeed.zero_stage}")
    check(not (cfg.optim.name == "lamb" and cfg.deepspeed.zero_stage == 3), "deepspeed.zero_stage",
          "LAMB is layer-wise at ZeRO stages 0-2 only (stage 3 steps flat sub-groups of all layers): use 0-2")
    check(cfg.deepspeed.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps", "must be >= 1")
    check(cfg.ray.num_workers >= 1, "ray.num_workers", "must be >= 1")
    check(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
    check(cfg.ray.max_failures >= 0, "ray.max_failures", "must be >= 0")
    check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    check(not cfg.run.output_dir.lower().startswith(("http://", "https://")), "run.output_dir",
          "http(s) locations are read-only: use a local path, s3:// or gs://")
    check(cfg.checkpoint.preempt_grace_s > 0, "checkpoint.preempt_grace_s", "must be > 0")
    check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the newest is always kept)")
    check(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    check(cfg.eval.async_num_cpus > 0 and cfg.eval.async_num_gpus >= 0, "eval.async_num_cpus",
          "async_num_cpus must be > 0 and async_num_gpus >= 0")
    unknown_trackers = [t for t in cfg.run.trackers if t not in TRACKERS]
    check(not unknown_trackers, "run.trackers", f"unknown tracker {unknown_trackers[0] if unknown_trackers else None!r} (valid: {', '.join(TRACKERS)})")
    check(len(set(cfg.run.trackers)) == len(cfg.run.trackers), "run.trackers", "lists a tracker twice")
    profile = cfg.run.profile_steps
    check(not profile or (len(profile) == 2 and 1 <= profile[0] <= profile[1]), "run.profile_steps",
          f"must be [first, last] with 1 <= first <= last (optimizer steps), got {list(profile)}")
    check(not (cfg.model.compile and cfg.deepspeed.zero_stage == 3), "model.compile",
          "not supported with deepspeed.zero_stage 3 (ZeRO-3 gathers parameters in hooks the compiled graph "
          "would break on): use zero_stage <= 2")
    check(not (cfg.optim.ema_decay and cfg.deepspeed.zero_stage == 3), "optim.ema_decay",
          "weight EMA needs full parameters on every rank: use deepspeed.zero_stage <= 2")
    zeroshot_names = [zeroshot_entry(e)[0] for e in cfg.eval.zeroshot]
    check(len(set(zeroshot_names)) == len(zeroshot_names), "eval.zeroshot",
          f"set names must be unique, got {zeroshot_names} (name them: NAME=PATH)")
    contrastive = cfg.contrastive
    check(contrastive.lock_image_unlocked_groups >= 0, "contrastive.lock_image_unlocked_groups", "must be >= 0")
    check(contrastive.lock_text_unlocked_layers >= 0, "contrastive.lock_text_unlocked_layers", "must be >= 0")
    dims = contrastive.matryoshka_dims
    check(all(d >= 1 for d in dims) and len(set(dims)) == len(dims), "contrastive.matryoshka_dims",
          f"must be distinct positive widths, got {list(dims)}")
    weights = contrastive.matryoshka_weights
    check(weights is None or len(weights) == len(dims), "contrastive.matryoshka_weights",
          f"needs one weight per matryoshka_dims entry ({len(dims)}), got {0 if weights is None else len(weights)}")
    check(weights is None or all(w > 0 for w in weights), "contrastive.matryoshka_weights", "weights must be > 0")
    if cfg.data.global_batch_size is not None:
        per_step = cfg.data.batch_size_per_rank * cfg.deepspeed.gradient_accumulation_steps * cfg.ray.num_workers
        check(cfg.data.global_batch_size == per_step, "data.global_batch_size",
              f"DeepSpeed needs global batch = batch_size_per_rank x gradient_accumulation_steps x "
              f"ray.num_workers = {cfg.data.batch_size_per_rank} x {cfg.deepspeed.gradient_accumulation_steps}"
              f" x {cfg.ray.num_workers} = {per_step}, got {cfg.data.global_batch_size}")


def zeroshot_entry(entry: str) -> tuple[str, str]:
    """An eval.zeroshot entry, 'NAME=PATH' or 'PATH' (NAME = the folder's name) -> (name, path)."""
    name, sep, path = entry.partition("=")
    if not sep or not name or "/" in name:
        return Path(entry.rstrip("/")).name, entry
    return name, path


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(text, "override must look like section.key=value", "--set")
    path, raw_value = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(path, "override key must be section.key", "--set")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return parts, value


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML file, apply `--set` overrides, validate. Raises ConfigError naming key and file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError("<file>", f"cannot read config: {err.strerror}", source) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<yaml>"
        raise ConfigError(where, f"invalid YAML: {getattr(err, 'problem', err)}", source) from None
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "expected a mapping of sections", source)
    for override in overrides:
        (section, key), value = parse_override(override)
        if section not in SECTIONS:
            raise ConfigError(f"{section}.{key}", f"unknown section (valid: {', '.join(SECTIONS)})", "--set")
        current = raw.setdefault(section, {}) or {}
        raw[section] = {**current, key: value}
    return Config.from_dict(raw, source)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples -> lists so the YAML is readable by safe_load and by people."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
