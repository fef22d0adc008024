"""CLIP / SigLIP models by open_clip architecture name, plus the project's tiny CPU architectures.

Any name open_clip knows (RN50, RN101, RN50x4, ViT-B-32, ViT-B-16, ViT-SO400M-14-SigLIP, ...) builds
randomly initialised; `model.pretrained_path` then loads a local open_clip weights file without
executing pickled code. The tiny architectures in clip_configs/ are registered with open_clip the
supported way (open_clip.add_model_config), so open_clip's own factory, tokenizer and exports know them.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator

import open_clip
import torch

from pipeline.remote_refs import load_weights_file
from pipeline.models.loading import load_strict

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
# name -> what it is for; the JSON files are the architecture.
TINY_CLIP_MODELS: dict[str, str] = {
    "clip-tiny-rn": "ModifiedResNet tower [1,1,1,1] width 16 + 2-layer text, 32 px, embed 64 (4.6M params)",
    "clip-tiny-vit": "ViT tower 4x128 patch 8 + 2-layer text, 32 px, embed 64 (4.1M params)",
}
# SigLIP's initialisation (Zhai et al. 2023): t' = log 10, b = -10, so the many negatives start near 0 loss.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0

_registered = False


def register_tiny_configs() -> None:
    """Make the clip_configs/*.json architectures open_clip models (once per process)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CLIP_CONFIG_DIR)
        _registered = True


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Around open_clip.create_model(pretrained=None) when we load weights right after: open_clip's factory
    then logs "No pretrained weights loaded ... Model initialized randomly" (through the root logger), which
    is untrue by the time anyone reads it. Only that notice is dropped."""
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def check_clip_name(name: str) -> None:
    register_tiny_configs()
    if name not in open_clip.list_models():
        tiny = ", ".join(TINY_CLIP_MODELS)
        raise ValueError(f"model.name: {name!r} is not an open_clip architecture (tiny: {tiny}; or any of "
                         f"open_clip.list_models(), e.g. RN50, ViT-B-32)")


def clip_embed_dim(name: str) -> int:
    """The joint embedding width of an open_clip architecture (its config's embed_dim)."""
    register_tiny_configs()
    return int(open_clip.get_model_config(name)["embed_dim"])


def normalized_prefix(features: torch.Tensor, width: int | None) -> torch.Tensor:
    """Matryoshka truncation: each embedding's first `width` dims, L2-normalised (None: the whole embedding).

    Normalising is scale-invariant, so this gives the same for raw features as for the model's already
    normalised ones (normalize(normalize(f)[:w]) == normalize(f[:w])): the loss can slice what the model's
    forward returns and evaluation the raw encode_image / encode_text features, with one result."""
    if width is not None and width > features.shape[-1]:
        raise ValueError(f"embedding width {width} is larger than the model's ({features.shape[-1]})")
    return torch.nn.functional.normalize(features[..., :width], dim=-1)


def open_clip_train_exempt(name: str, param: torch.Tensor) -> bool:
    """open_clip_train's weight-decay exemption, verbatim (open_clip_train/main.py `exclude`).

    Everything 1-D (norms, biases, class embedding, logit scale and bias) plus any parameter whose name
    contains 'bn', 'ln', 'bias' or 'logit_scale'; 2-D embeddings (token, positional) ARE decayed. Substring
    tests on parameter names are the reference's own rule, kept as is so our groups equal its groups.
    """
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def get_tokenizer(name: str):
    register_tiny_configs()
    return open_clip.get_tokenizer(name)


def build_clip(model_cfg, contrastive_cfg) -> torch.nn.Module:
    """open_clip model returning a dict of normalised features, exp'd logit scale (and bias for SigLIP)."""
    check_clip_name(model_cfg.name)
    # DeepSpeed broadcasts parameters as byte views, which a 0-d tensor cannot give: the logit scale
    # (and bias) are 1-element vectors, as open_clip's own `nonscalar_logit_scale` option makes them
    # (open_clip.load_checkpoint reshapes either way when loading).
    kwargs = {"nonscalar_logit_scale": True}
    if contrastive_cfg.loss == "siglip":
        # The sigmoid loss starts from SigLIP's scale and bias whatever the architecture says: open_clip's
        # *-SigLIP configs set the bias but leave the scale at CLIP's log(1/0.07), and CLIP architectures
        # have no bias at all.
        kwargs.update(init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    quiet = weights_loaded_after() if model_cfg.pretrained_path else contextlib.nullcontext()
    with quiet:
        model = open_clip.create_model(model_cfg.name, pretrained=None, output_dict=True, **kwargs)
    if model_cfg.pretrained_path:
        load_pretrained(model, model_cfg.pretrained_path, model_cfg.name)
    apply_locking(model, contrastive_cfg)
    if model_cfg.grad_checkpointing:
        # open_clip's ModifiedResNet tower ignores this (only transformer blocks checkpoint).
        model.set_grad_checkpointing(True)
    return model


def load_pretrained(model: torch.nn.Module, path: str, name: str) -> None:
    """Weights from an open_clip state-dict file (.pt/.bin/.safetensors), loaded safely and strictly."""
    load_strict(model, adapt_open_clip_state(model, load_weights_file(path)), f"model.pretrained_path: {path}", name)


def adapt_open_clip_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state-dict fixes open_clip.load_checkpoint applies, on an already safely loaded dict: OpenAI's
    layout converted, a custom-text model's keys, a logit scale (and bias) reshaped to the model's (ours are
    1-element vectors, open_clip's 0-d), a missing bias zeroed, positional embeddings resized."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state


def apply_locking(model: torch.nn.Module, contrastive_cfg) -> None:
    """LiT (Zhai et al. 2022): freeze a tower; its parameters then leave the optimizer entirely."""
    cfg = contrastive_cfg
    if cfg.lock_image:
        try:
            model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                   freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
        except AssertionError as err:  # open_clip asserts on what a tower cannot do (partial RN locking)
            raise ValueError(f"contrastive.lock_image_unlocked_groups: {err}") from None
    if cfg.lock_text:
        # open_clip's built-in text transformer locks its LayerNorms with their layers and asserts when
        # asked otherwise; leaving them trainable is an option of Hugging Face text towers only.
        builtin_text = isinstance(model, open_clip.CLIP)
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers,
                              freeze_layer_norm=cfg.lock_text_freeze_layer_norm or builtin_text)
