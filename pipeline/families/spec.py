"""The fields of a model family: what every stage may ask of a `model.kind` (see pipeline/families/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # annotations only: the registry imports without torch; the family modules bring it
    import torch

    from pipeline.config import Config

Transform = Callable  # PIL image -> tensor
Tokenizer = Callable  # list of strings -> token tensor


@dataclass(frozen=True)
class Rebuilt:
    """A model rebuilt from weights, ready to evaluate, with what evaluating it needs."""

    model: torch.nn.Module
    preprocess: Transform
    """The family's eval_transform for this model (and, for our checkpoints, its run's config)."""
    tokenizer: Optional[Tokenizer] = None
    """Text tokenizer of families with a text tower, else None."""
    model_config: Optional[dict] = None
    """Library architecture config written beside exports (open_clip's), else None."""


@dataclass(frozen=True)
class HubFolder:
    """A library's own folder layout, the one its model hub serves: `launch export --format FORMAT --output DIR`
    writes `config_file` and `weights_file` into DIR, and the library loads DIR by itself ('local-dir:DIR')."""

    format: str
    """The `launch export --format` value ('open_clip-dir', 'timm-dir')."""
    config_file: str
    """The JSON file the library reads first ('open_clip_config.json', 'config.json')."""
    weights_file: str
    """The safetensors file the library picks in the folder."""
    config: Callable[[torch.nn.Module, str, Optional[dict], Optional[Config], Optional[list[str]]], dict]
    """(model, architecture name, model_config, our run's config or None, class names or None) -> the config
    file's content: everything the library needs to build the architecture and its eval transform unaided;
    ValueError when the library cannot build the architecture from a folder."""


@dataclass(frozen=True)
class ModelFamily:
    """One registered spec per `model.kind`. Every field is a value or a plain function of the family, so a new
    family is one file that fills these in (pipeline/families/classifier.py is the smallest example)."""

    name: str
    """The `model.kind` value this family answers to."""
    library: str
    """The library whose architectures it builds ('timm', 'open_clip'): the `--model LIBRARY:NAME` prefix,
    the `launch export --format` that writes files that library loads, ResolvedModel.library."""
    example_architecture: str
    """An architecture name for error messages (e.g. 'resnet50')."""
    data_kind: str
    """Which training shards it reads: 'labelled' (image + class; class names recorded in checkpoints) or
    'image_text' (image + caption)."""
    task: str
    """Its training task, 'module:Class' (a pipeline.tasks.base.Task), imported only when a run uses it."""
    distill_task: Optional[str]
    """Its training task with a frozen teacher (launch distill), 'module:Class'; None: not distillable."""
    eval_tasks: tuple[str, ...]
    """The `launch eval` tasks (pipeline.evaluation.tasks.EVAL_TASKS) that can score it. 'zeroshot' here also
    allows eval.zeroshot sets during training."""
    contrastive_losses: tuple[str, ...]
    """The contrastive.loss values it trains with; () = it does not read the contrastive section."""
    build: Callable[[Config, Optional[int]], torch.nn.Module]
    """(config, num_classes) -> a new model for training: initialised, model.pretrained_path loaded,
    gradient checkpointing set. num_classes is the head size of families with one (None otherwise)."""
    has_architecture: Callable[[str], bool]
    """Whether its library knows an architecture name (resolving `--model NAME`)."""
    load_state: Callable[[torch.nn.Module, dict, str, str], None]
    """(model, state dict, what, name): load every weight strictly, adapting the library's own formats
    first (open_clip's OpenAI layout and 0-d logit scale, a timm head sized for other classes); ValueError
    naming `what` (the file) and `name` (the architecture) when keys are missing or left over."""
    from_weights: Callable[[str, dict, str], Rebuilt]
    """(architecture name, state dict, what) -> Rebuilt: an outside weights file of its library."""
    from_checkpoint: Callable[[Config, dict], Rebuilt]
    """(the checkpoint's config, state dict) -> Rebuilt: one of our checkpoints or exports, evaluated as the
    training run validated it."""
    eval_transform: Callable[[torch.nn.Module, Optional[Config]], Transform]
    """(model, our run's config or None for outside weights) -> the transform evaluation applies."""
    features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    """(model, image batch) -> image features (N, D): what the linear probe fits on."""
    no_weight_decay: Callable[[str, torch.Tensor], bool]
    """(parameter name, parameter) -> True when the parameter is exempt from weight decay (pipeline.optim)."""
    tokenizer: Optional[Callable[[str], Tokenizer]]
    """architecture name -> its text tokenizer; None for image-only families."""
    export_files: Callable[[str, Optional[dict], Path], list[Path]]
    """(architecture name, model_config, weights path) -> files written beside an export in its library's
    format, which that library needs to load it by name (open_clip: NAME.json for architectures it does not
    ship); ValueError when its library cannot load the architecture by name at all. Called before the
    weights are written."""
    hub_folder: Optional[HubFolder] = None
    """Its library's hub folder layout (`launch export --format <library>-dir`); None: no folder export."""
