"""Residual classifiers by name, built by timm.

Named entries are the ResNet family the papers use; any other timm model name is accepted too
(res2net, resnest, regnet ...), so the registry never stands between a user and timm.
"""
from __future__ import annotations

import functools
from typing import Callable

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet

from pipeline.remote_refs import load_weights_file


_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


_TINY_LAYERS = (1, 1, 1, 1)
_TINY_CHANNELS = {"resnet_tiny": (64, 128, 256, 512), "resnet_nano": (16, 32, 64, 128)}


def _tiny_resnet(name: str, **kwargs) -> ResNet:
    # BasicBlock x [1,1,1,1]: the smallest real ResNet; trains on 32 px digits in seconds on a CPU.
    # timm.create_model passes its factory bookkeeping along; the ResNet class takes none of it.
    kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KWARGS}
    return ResNet(block=BasicBlock, layers=_TINY_LAYERS, channels=_TINY_CHANNELS[name], **kwargs)


@register_model
def resnet_tiny(pretrained: bool = False, **kwargs) -> ResNet:
    """BasicBlock x [1,1,1,1], 64-512 channels (4.9M params): registered with timm, so our checkpoints
    exported in timm's format load with timm.create_model('resnet_tiny') after importing pipeline.models."""
    return _tiny_resnet("resnet_tiny", **kwargs)


@register_model
def resnet_nano(pretrained: bool = False, **kwargs) -> ResNet:
    """BasicBlock x [1,1,1,1], 16-128 channels (0.3M params), for tests."""
    return _tiny_resnet("resnet_nano", **kwargs)


def stock_timm_equivalent(name: str) -> tuple[str, dict]:
    """(a timm architecture every timm install has, its model_args) that build the same network as `name`.

    timm's resnet18 factory lets model_args override its layers (dict(model_args, **kwargs)) and passes
    channels on to the ResNet class, so resnet18 + these arguments is our tiny ResNet, weight for weight: a
    timm-dir export names it and loads in plain timm, without `import pipeline.models`. Any other name is
    returned as it is, with no arguments."""
    if name in _TINY_CHANNELS:
        return "resnet18", {"layers": list(_TINY_LAYERS), "channels": list(_TINY_CHANNELS[name])}
    return name, {}


RESIDUAL_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    # name -> factory(num_classes=, drop_path_rate=, zero_init_last=)
    "resnet_tiny": resnet_tiny,
    "resnet_nano": resnet_nano,
    **{
        name: functools.partial(timm.create_model, name, pretrained=False)
        for name in (
            "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
            "resnext50_32x4d", "resnet50d", "resnetv2_50",
        )
    },
}


def model_factory(name: str) -> Callable[..., torch.nn.Module]:
    if name in RESIDUAL_MODELS:
        return RESIDUAL_MODELS[name]
    if timm.is_model(name):
        return functools.partial(timm.create_model, name, pretrained=False)
    raise ValueError(
        f"model.name: unknown model {name!r} (registered: {', '.join(RESIDUAL_MODELS)}; or any timm model name)"
    )


def build_classifier(model_cfg, num_classes: int) -> torch.nn.Module:
    """timm classifier with stochastic depth and zero-init-last-BN as configured."""
    factory = model_factory(model_cfg.name)
    kwargs = {"num_classes": num_classes, "drop_path_rate": model_cfg.drop_path_rate}
    try:
        model = factory(zero_init_last=model_cfg.zero_init_last, **kwargs)
    except TypeError:
        # Not every timm family has zero-init-last; decided by what the class accepts, not its name.
        model = factory(**kwargs)
    if model_cfg.pretrained_path:
        state = load_weights_file(model_cfg.pretrained_path)
        # A different head size (fine-tuning to new classes) keeps the backbone and re-inits the head.
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in state]
        if head is None and missing:
            raise ValueError(f"model.pretrained_path: weights do not match {model_cfg.name}: missing {missing[:3]}")
        model.load_state_dict(state, strict=False)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
