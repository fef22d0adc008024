"""model.kind 'clip': open_clip CLIP / SigLIP models (any open_clip architecture) trained on image-text shards."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2

from pipeline.config import Config
from pipeline.families.spec import HubFolder, ModelFamily, Rebuilt
from pipeline.models.clip import (adapt_open_clip_state, build_clip, get_tokenizer, open_clip_train_exempt,
                                  register_tiny_configs, weights_loaded_after)
from pipeline.models.loading import load_strict

_OPEN_CLIP_BUILTIN_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


def build(cfg: Config, num_classes: int | None) -> torch.nn.Module:
    return build_clip(cfg.model, cfg.contrastive)


def has_architecture(name: str) -> bool:
    register_tiny_configs()  # clip-tiny-rn / clip-tiny-vit
    return name in open_clip.list_models()


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    load_strict(model, adapt_open_clip_state(model, state), what, name)


def eval_transform(model: torch.nn.Module, cfg: Config | None):
    """open_clip's validation transform for the model (what create_model_and_transforms returns), for our
    checkpoints too: exports then evaluate in open_clip exactly as here."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def from_weights(name: str, state: dict[str, torch.Tensor], what: str) -> Rebuilt:
    with weights_loaded_after():
        model = open_clip.create_model(name, pretrained=None)
    load_state(model, state, what, name)
    return Rebuilt(model, eval_transform(model, None), get_tokenizer(name), open_clip.get_model_config(name))


def from_checkpoint(cfg: Config, state: dict[str, torch.Tensor]) -> Rebuilt:
    # Our CLIP models are open_clip models (the tiny ones registered from pipeline/models/clip_configs);
    # rebuilding the plain open_clip architecture makes exports load in open_clip unchanged (load_state
    # reshapes our 1-element logit scale to open_clip's scalar).
    register_tiny_configs()
    return from_weights(cfg.model.name, state, "checkpoint")


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # CLIP_benchmark probes the L2-normalised embedding, the space zero-shot also uses.
    return F.normalize(model.encode_image(images).float(), dim=-1)


def export_files(name: str, model_config: dict | None, output: Path) -> list[Path]:
    if (_OPEN_CLIP_BUILTIN_CONFIGS / f"{name}.json").is_file():
        return []
    if model_config is None:
        raise ValueError(f"{name}: no open_clip config known for this architecture")
    config_path = output.parent / f"{name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(model_config, indent=2) + "\n")
    return [config_path]


def open_clip_folder_config(model: torch.nn.Module, name: str, model_config: dict | None, cfg: Config | None,
                            class_names: list[str] | None) -> dict:
    """open_clip's open_clip_config.json (what create_model_and_transforms('local-dir:DIR') reads): the full
    architecture in model_cfg, so architectures open_clip does not ship (our clip-tiny-*) load without our
    package, and preprocess_cfg, the model's own eval transform (eval_transform above)."""
    if model_config is None:
        raise ValueError(f"--format open_clip-dir: {name}: no open_clip config known for this architecture")
    return {"model_cfg": model_config, "preprocess_cfg": dict(model.visual.preprocess_cfg)}


FAMILY = ModelFamily(
    name="clip",
    library="open_clip",
    example_architecture="ViT-B-32",
    data_kind="image_text",
    task="pipeline.tasks.contrastive:ContrastiveTask",
    distill_task="pipeline.tasks.distill:DistillContrastiveTask",
    eval_tasks=("zeroshot", "retrieval", "linear-probe"),
    contrastive_losses=("clip", "siglip"),
    build=build,
    has_architecture=has_architecture,
    load_state=load_state,
    from_weights=from_weights,
    from_checkpoint=from_checkpoint,
    eval_transform=eval_transform,
    features=features,
    no_weight_decay=open_clip_train_exempt,
    tokenizer=get_tokenizer,
    export_files=export_files,
    hub_folder=HubFolder(format="open_clip-dir", config_file="open_clip_config.json",
                         weights_file="open_clip_model.safetensors", config=open_clip_folder_config),
)
