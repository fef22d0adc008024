"""model.kind 'classifier': timm residual networks (any timm classifier) trained on labelled shards."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config

from pipeline.config import Config
from pipeline.data.labelled import eval_data_config
from pipeline.data.labelled import eval_transform as run_eval_transform
from pipeline.families.spec import HubFolder, ModelFamily, Rebuilt
from pipeline.models.loading import load_strict
from pipeline.models.residual import build_classifier, stock_timm_equivalent
from pipeline.optim import weights_only


def build(cfg: Config, num_classes: int | None) -> torch.nn.Module:
    assert num_classes is not None, "a classifier is built with its number of classes"
    return build_classifier(cfg.model, num_classes)


def _head_name(model: torch.nn.Module) -> str:
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    """Strict, after resizing the head to the number of classes the weights were trained with."""
    weight = state.get(f"{_head_name(model)}.weight")
    if weight is not None and weight.shape[0] != model.num_classes:
        model.reset_classifier(weight.shape[0])
    load_strict(model, state, what, name)


def eval_transform(model: torch.nn.Module, cfg: Config | None):
    """Our run's own validation transform (eval sees images exactly as validation did); timm's for the
    model's pretrained config otherwise."""
    if cfg is not None:
        return run_eval_transform(cfg.data)
    return create_transform(**resolve_data_config({}, model=model))


def from_weights(name: str, state: dict[str, torch.Tensor], what: str) -> Rebuilt:
    model = timm.create_model(name, pretrained=False)
    load_state(model, state, what, name)
    return Rebuilt(model, eval_transform(model, None))


def from_checkpoint(cfg: Config, state: dict[str, torch.Tensor]) -> Rebuilt:
    # The init file of a fine-tuning run may be gone by now; the checkpoint holds every weight anyway.
    model_cfg = dataclasses.replace(cfg.model, pretrained_path=None, grad_checkpointing=False)
    model = build_classifier(model_cfg, num_classes=cfg.data.num_classes or 2)
    load_state(model, state, "checkpoint", cfg.model.name)
    return Rebuilt(model, eval_transform(model, cfg))


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # timm's pre-logits: the pooled features the classifier head sees.
    return model.forward_head(model.forward_features(images), pre_logits=True).float()


def export_files(name: str, model_config: dict | None, output: Path) -> list[Path]:
    if not timm.is_model(name):
        raise ValueError(f"--format timm: {name} is not a timm-registered architecture, so timm.create_model "
                         "cannot build it by name; use --format safetensors")
    return []


def timm_folder_config(model: torch.nn.Module, name: str, model_config: dict | None, cfg: Config | None,
                       class_names: list[str] | None) -> dict:
    """timm's config.json (the layout timm.models.load_model_config_from_path reads): the architecture as a
    name plain timm knows (our tiny ResNets as resnet18 + model_args, see stock_timm_equivalent), the head
    size and label names, and pretrained_cfg = our eval transform, so timm.data.resolve_data_config on the
    loaded model rebuilds it."""
    architecture, model_args = stock_timm_equivalent(name)
    if not timm.is_model(architecture):
        raise ValueError(f"--format timm-dir: {name} is not a timm-registered architecture, so timm cannot build "
                         "it from a folder; use --format safetensors")
    data_config = eval_data_config(cfg.data) if cfg is not None else resolve_data_config({}, model=model)
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
    pretrained_cfg = {**data_config, "input_size": list(data_config["input_size"]), "mean": list(data_config["mean"]),
                      "std": list(data_config["std"]), "num_classes": model.num_classes,
                      "classifier": _head_name(model), "first_conv": first_conv}
    config = {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features}
    if class_names:
        config["label_names"] = list(class_names)
    if model_args:
        config["model_args"] = model_args
    return {**config, "pretrained_cfg": pretrained_cfg}


FAMILY = ModelFamily(
    name="classifier",
    library="timm",
    example_architecture="resnet50",
    data_kind="labelled",
    task="pipeline.tasks.classify:ClassifyTask",
    distill_task="pipeline.tasks.distill:DistillClassifierTask",
    # Any image features can be probed: a classifier's pre-logits too.
    eval_tasks=("classify", "linear-probe"),
    contrastive_losses=(),
    build=build,
    has_architecture=timm.is_model,
    load_state=load_state,
    from_weights=from_weights,
    from_checkpoint=from_checkpoint,
    eval_transform=eval_transform,
    features=features,
    no_weight_decay=weights_only,
    tokenizer=None,
    export_files=export_files,
    hub_folder=HubFolder(format="timm-dir", config_file="config.json", weights_file="model.safetensors",
                         config=timm_folder_config),
)
