"""Checkpoint references: one resolver that eval, export (and later distill / fine-tuning) share.

A REF is one of
  * a run directory (RUN/checkpoints/step_*/ ...): its latest complete checkpoint;
  * one of our checkpoint directories (DeepSpeed shards of any ZeRO stage + meta.json);
  * a file we exported (.safetensors metadata, or the `metadata` entry of a .pt/.pth/.bin, names the
    architecture and the run's config: no --model needed, and a --model naming the same architecture
    evaluates it exactly as its source checkpoint, with the training run's eval transform);
  * an open_clip weights file (.bin/.pt/.pth/.safetensors) with --model NAME;
  * a timm checkpoint with --model NAME.

--model NAME is looked up in open_clip's registry, then timm's; 'open_clip:NAME' / 'timm:NAME' pick one
explicitly, and 'PATH/NAME.json' (or a NAME.json beside the weights file) registers an open_clip
config first. Nothing is loaded by executing pickled code: weights files through
pipeline.checkpoint.load_weights_file, our checkpoint directories through pipeline.checkpoint.load_consolidated
(every shard checked weights-only first; a file that would run code is refused with one line naming it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import timm
import torch
from timm.data import create_transform, resolve_data_config

import pipeline.models.residual  # noqa: F401  registers resnet_tiny / resnet_nano with timm (--model resnet_tiny)
from pipeline.checkpoint import load_weights_file, safe_torch_load
from pipeline.models.clip import register_tiny_configs, weights_loaded_after

Transform = Callable
# safetensors metadata keys our exports write (see pipeline.evaluation.export).
META_LIBRARY, META_MODEL, META_STEP = "resclip.library", "resclip.model", "resclip.step"
META_CONFIG = "resclip.model_config"  # open_clip architecture config
META_RUN_CONFIG = "resclip.run_config"  # our checkpoint's full config: rebuilds our own architectures
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ResolvedModel:
    model: torch.nn.Module
    """In eval mode, on the CPU."""
    kind: str
    """'clip' (encode_image / encode_text) or 'classifier' (images -> logits)."""
    library: str
    """Which library's architecture it is: 'open_clip' or 'timm' (where exports go)."""
    model_name: str
    preprocess: Transform
    """PIL image -> tensor, the library's evaluation transform for this model."""
    tokenizer: Callable | None
    """open_clip tokenizer for 'clip' models, None for classifiers."""
    step: int | None
    """Training step of our checkpoints; None for outside files."""
    content_sha256: str
    """sha256 of the weights actually evaluated (see state_dict_sha256)."""
    source: str
    """What the reference resolved to: 'run_dir', 'checkpoint', 'export' or 'weights_file'."""
    path: Path
    model_config: dict | None = None
    """open_clip model config (architecture), written beside open_clip exports."""
    run_config: dict | None = None
    """Our checkpoint's resolved config (pipeline.config), carried into safetensors exports."""


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order.

    Hashing tensors rather than file bytes means the same weights hash the same in a DeepSpeed
    checkpoint, a .pt export and a .safetensors export, so results can be matched across formats.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- model names ------------------------------------------------------------------------------------


def _register_open_clip_config(config_path: Path) -> str:
    open_clip.add_model_config(config_path)
    return config_path.stem


_CONFIG_DIR: Path | None = None


def register_open_clip_config(name: str, config: dict) -> None:
    """Make `name` an open_clip model. open_clip rescans its config files on every registration, so
    the file must outlive this call: it goes to one temporary folder kept for the process."""
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="open_clip_configs_"))
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def library_for(name: str, beside: Path | None = None) -> tuple[str, str]:
    """(library, model name) for a --model value; ValueError lists what would have been accepted."""
    register_tiny_configs()  # clip-tiny-rn / clip-tiny-vit; resnet_tiny / resnet_nano are registered by the import
    prefix, _, bare = name.partition(":")
    if bare and prefix in _LIBRARIES:
        known = bare in open_clip.list_models() if prefix == "open_clip" else timm.is_model(bare)
        if not known:
            example = "ViT-B-32" if prefix == "open_clip" else "resnet50"
            raise ValueError(f"--model {name}: {prefix} has no architecture {bare!r} (e.g. {prefix}:{example})")
        return prefix, bare
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--model {name}: no such open_clip model config file")
        return "open_clip", _register_open_clip_config(path)
    if name in open_clip.list_models():
        return "open_clip", name
    if timm.is_model(name):
        return "timm", name
    if beside is not None and (beside / f"{name}.json").is_file():
        return "open_clip", _register_open_clip_config(beside / f"{name}.json")
    raise ValueError(
        f"--model {name}: not an open_clip model ({len(open_clip.list_models())} known, e.g. ViT-B-32) "
        f"nor a timm model (e.g. resnet50); use 'open_clip:NAME', 'timm:NAME' or a NAME.json open_clip config"
    )


# -- building models from a state dict --------------------------------------------------------------


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what}: weights do not match model {name}: missing {result.missing_keys[:3]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:3]} ({len(result.unexpected_keys)})"
        )


def _adapt_open_clip_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state-dict fixes open_clip.load_checkpoint applies, on an already safely loaded dict."""
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


def _open_clip_model(name: str, state: dict[str, torch.Tensor], what: str) -> dict:
    with weights_loaded_after():
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    _load_strict(model, _adapt_open_clip_state(model, state), what, name)
    return {"model": model, "kind": "clip", "preprocess": preprocess, "tokenizer": open_clip.get_tokenizer(name),
            "model_config": open_clip.get_model_config(name)}


def _head_name(model: torch.nn.Module) -> str:
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head)


def _fit_head(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize a timm model's classifier to the number of classes the weights were trained with."""
    weight = state.get(f"{_head_name(model)}.weight")
    if weight is not None and weight.shape[0] != model.num_classes:
        model.reset_classifier(weight.shape[0])


def _timm_model(name: str, state: dict[str, torch.Tensor], what: str) -> dict:
    model = timm.create_model(name, pretrained=False)
    _fit_head(model, state)
    _load_strict(model, state, what, name)
    preprocess = create_transform(**resolve_data_config({}, model=model))
    return {"model": model, "kind": "classifier", "preprocess": preprocess, "tokenizer": None, "model_config": None}


_LIBRARIES: dict[str, Callable[[str, dict, str], dict]] = {"open_clip": _open_clip_model, "timm": _timm_model}


# -- our own checkpoints ----------------------------------------------------------------------------


def _ours_classifier(cfg, state: dict[str, torch.Tensor]) -> dict:
    from pipeline.data.labelled import eval_transform
    from pipeline.models import build_model

    # The init file of a fine-tuning run may be gone by now; the checkpoint holds every weight anyway.
    model_cfg = dataclasses.replace(cfg.model, pretrained_path=None, grad_checkpointing=False)
    model = build_model(model_cfg, num_classes=cfg.data.num_classes or 2)
    _fit_head(model, state)
    _load_strict(model, state, "checkpoint", cfg.model.name)
    # The training run's own validation transform: eval sees images exactly as validation did.
    preprocess = eval_transform(cfg.data)
    return {"model": model, "kind": "classifier", "library": "timm", "preprocess": preprocess, "tokenizer": None}


def _ours_clip(cfg, state: dict[str, torch.Tensor]) -> dict:
    # Our CLIP models are open_clip models (the tiny ones registered from pipeline/models/clip_configs);
    # rebuilding the plain open_clip architecture makes exports load in open_clip unchanged
    # (_adapt_open_clip_state reshapes our 1-element logit scale to open_clip's scalar).
    from pipeline.models.clip import register_tiny_configs

    register_tiny_configs()
    built = _open_clip_model(cfg.model.name, state, "checkpoint")
    return {**built, "library": "open_clip"}


_OUR_KINDS: dict[str, Callable] = {"classifier": _ours_classifier, "clip": _ours_clip}


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _build_ours(raw_config: dict, state: dict[str, torch.Tensor], where: Path) -> dict:
    from pipeline.config import Config

    cfg = Config.from_dict(raw_config, source=str(where))
    if cfg.model.kind not in _OUR_KINDS:
        raise ValueError(f"{where}: model kind {cfg.model.kind!r} cannot be evaluated "
                         f"(valid: {', '.join(_OUR_KINDS)})")
    built = _OUR_KINDS[cfg.model.kind](cfg, _strip_module_prefix(state))
    built.setdefault("model_config", None)
    return {**built, "run_config": raw_config, "name": cfg.model.name}


def _resolve_checkpoint_dir(ckpt_dir: Path, source: str) -> ResolvedModel:
    from pipeline.checkpoint import load_consolidated

    state, meta = load_consolidated(ckpt_dir)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{ckpt_dir / 'meta.json'}: records no training config, so the architecture is unknown")
    built = _build_ours(meta["config"], state, ckpt_dir / "meta.json")
    return _finish(built, built.pop("name"), meta.get("step"), source, ckpt_dir)


def _finish(built: dict, name: str, step: int | None, source: str, path: Path) -> ResolvedModel:
    model = built.pop("model").eval()
    return ResolvedModel(model=model, model_name=name, step=step, source=source, path=path,
                         content_sha256=state_dict_sha256(model.state_dict()), **built)


# -- files ------------------------------------------------------------------------------------------


def _export_metadata(path: Path) -> dict[str, str]:
    """What our exports record about the weights (pipeline.evaluation.export._metadata); {} otherwise."""
    if path.suffix != ".safetensors":
        blob = safe_torch_load(path, mmap=True)  # mmap: the tensors are read once, by load_weights_file
        meta = blob.get("metadata") if isinstance(blob, dict) else None
        return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _names_the_export(model_name: str, meta: dict[str, str]) -> bool:
    """--model names the architecture the export records (bare or as 'library:NAME')."""
    prefix, _, bare = model_name.partition(":")
    if bare and prefix in _LIBRARIES:
        return prefix == meta.get(META_LIBRARY) and bare == meta.get(META_MODEL)
    return model_name == meta.get(META_MODEL)


def _resolve_file(path: Path, model_name: str | None) -> ResolvedModel:
    meta = _export_metadata(path)
    if model_name is not None and _names_the_export(model_name, meta):
        model_name = None  # the export's own record says more than the name: the run's config and step
    if model_name is None and META_RUN_CONFIG in meta:
        built = _build_ours(json.loads(meta[META_RUN_CONFIG]), load_weights_file(path), path)
        step = int(meta[META_STEP]) if meta.get(META_STEP) else None
        return _finish(built, built.pop("name"), step, "export", path)
    if model_name is None and META_LIBRARY in meta:
        library, name = meta[META_LIBRARY], meta[META_MODEL]
        if library == "open_clip" and meta.get(META_CONFIG) and name not in open_clip.list_models():
            # Our exports carry the architecture for models open_clip does not ship (the tiny ones).
            register_open_clip_config(name, json.loads(meta[META_CONFIG]))
        step = int(meta[META_STEP]) if meta.get(META_STEP) else None
        source = "export"
    elif model_name is None:
        raise ValueError(f"{path}: a weights file needs --model NAME (an open_clip or timm architecture)")
    else:
        library, name = library_for(model_name, beside=path.parent)
        step, source = None, "weights_file"
    state = load_weights_file(path)
    built = {**_LIBRARIES[library](name, state, str(path)), "library": library}
    return _finish(built, name, step, source, path)


def resolve(ref: str, model_name: str | None = None) -> ResolvedModel:
    """Turn a checkpoint reference into a ready-to-evaluate model; ValueError for user mistakes."""
    from pipeline import storage

    if storage.is_remote(ref):  # s3:// / gs:// / https://: a local copy (cached), then the same code paths
        from pipeline.remote_refs import localize

        ref = str(localize(ref))
    path = Path(ref)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return _resolve_checkpoint_dir(path, "checkpoint")
        if (path / "checkpoints").is_dir():
            from pipeline.checkpoint import find_latest_complete

            latest = find_latest_complete(path)
            if latest is None:
                raise ValueError(f"{path}: run directory without a complete checkpoint")
            return _resolve_checkpoint_dir(latest, "run_dir")
        raise ValueError(f"{path}: not a run directory (no checkpoints/) nor a checkpoint (no meta.json)")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path}: unknown weights file type (valid: {', '.join(WEIGHT_SUFFIXES)})")
        return _resolve_file(path, model_name)
    raise ValueError(f"{ref}: no such checkpoint, run directory or weights file")
