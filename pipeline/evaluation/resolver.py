"""Checkpoint references: one resolver that eval, export and distill (its teacher) share.

A REF is one of
  * a run directory (RUN/checkpoints/step_*/ ...): its latest complete checkpoint;
  * one of our checkpoint directories (DeepSpeed shards of any ZeRO stage + meta.json);
  * a file we exported (.safetensors metadata, or the `metadata` entry of a .pt/.pth/.bin, names the
    architecture and the run's config: no --model needed, and a --model naming the same architecture
    evaluates it exactly as its source checkpoint, with the training run's eval transform);
  * a folder in a library's hub layout (`launch export --format timm-dir|open_clip-dir`, a model soup): its
    weights file, as above;
  * an open_clip weights file (.bin/.pt/.pth/.safetensors) with --model NAME;
  * a timm checkpoint with --model NAME.

--model NAME is looked up in the model families' libraries (pipeline.families: open_clip's registry, then
timm's); 'open_clip:NAME' / 'timm:NAME' pick one explicitly, and 'PATH/NAME.json' (or a NAME.json beside the weights file) registers an open_clip
config first. Nothing is loaded by executing pickled code: weights files through
pipeline.remote_refs.load_weights_file, our checkpoint directories through pipeline.checkpoint.load_consolidated
(every shard checked weights-only first; a file that would run code is refused with one line naming it).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch

from pipeline import families
from pipeline.checkpoint import safe_torch_load
from pipeline.remote_refs import WEIGHT_SUFFIXES, load_weights_file

Transform = Callable
# safetensors metadata keys our exports write (see pipeline.evaluation.export).
META_LIBRARY, META_MODEL, META_STEP = "resclip.library", "resclip.model", "resclip.step"
META_CONFIG = "resclip.model_config"  # open_clip architecture config
META_RUN_CONFIG = "resclip.run_config"  # our checkpoint's full config: rebuilds our own architectures


@dataclass
class ResolvedModel:
    model: torch.nn.Module
    """In eval mode, on the CPU."""
    kind: str
    """Its model family (pipeline.families): 'clip' (encode_image / encode_text) or 'classifier' (logits)."""
    library: str
    """Which library's architecture it is: its family's library, 'open_clip' or 'timm' (where exports go)."""
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
    prefix, _, bare = name.partition(":")
    named = families.by_library(prefix) if bare else None
    if named is not None:
        if not named.has_architecture(bare):
            raise ValueError(f"--model {name}: {prefix} has no architecture {bare!r} "
                             f"(e.g. {prefix}:{named.example_architecture})")
        return prefix, bare
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--model {name}: no such open_clip model config file")
        return "open_clip", _register_open_clip_config(path)
    for family in families.all_families():  # registration order: see pipeline.families.FAMILIES
        if family.has_architecture(name):
            return family.library, name
    if beside is not None and (beside / f"{name}.json").is_file():
        return "open_clip", _register_open_clip_config(beside / f"{name}.json")
    known = " nor ".join(f"{f.library} (e.g. {f.example_architecture})" for f in families.all_families())
    libraries = ", ".join(f"'{f.library}:NAME'" for f in families.all_families())
    raise ValueError(f"--model {name}: not an architecture of {known}; use {libraries} or a NAME.json open_clip "
                     "config")


# -- building models from a state dict: the families' -----------------------------------------------


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _built(family: families.ModelFamily, rebuilt: families.Rebuilt) -> dict:
    return {"model": rebuilt.model, "kind": family.name, "library": family.library, "preprocess": rebuilt.preprocess,
            "tokenizer": rebuilt.tokenizer, "model_config": rebuilt.model_config}


def _build_outside(library: str, name: str, state: dict[str, torch.Tensor], what: str) -> dict:
    family = families.by_library(library)
    if family is None:  # an export's metadata naming a library we do not build
        valid = ", ".join(f.library for f in families.all_families())
        raise ValueError(f"{what}: no model family builds {library} architectures (valid: {valid})")
    return _built(family, family.from_weights(name, state, what))


def _build_ours(raw_config: dict, state: dict[str, torch.Tensor], where: Path) -> dict:
    from pipeline.config import Config

    cfg = Config.from_dict(raw_config, source=str(where))
    family = families.check_config(cfg, str(where))
    built = _built(family, family.from_checkpoint(cfg, _strip_module_prefix(state)))
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
    if bare and families.by_library(prefix) is not None:
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
    built = _build_outside(library, name, state, str(path))
    return _finish(built, name, step, source, path)


def _hub_layouts() -> list:
    """The families' hub folder layouts (pipeline.families.spec.HubFolder)."""
    return [f.hub_folder for f in families.all_families() if f.hub_folder is not None]


def _hub_folder_weights(folder: Path) -> Path | None:
    """The weights file of a folder in one of the families' hub layouts."""
    return next((folder / layout.weights_file for layout in _hub_layouts()
                 if (folder / layout.weights_file).is_file()), None)


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
        weights = _hub_folder_weights(path)
        if weights is not None:
            return _resolve_file(weights, model_name)
        names = " / ".join(layout.weights_file for layout in _hub_layouts())
        raise ValueError(f"{path}: not a run directory (no checkpoints/), a checkpoint (no meta.json) nor an "
                         f"exported folder (no {names})")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path}: unknown weights file type (valid: {', '.join(WEIGHT_SUFFIXES)})")
        return _resolve_file(path, model_name)
    raise ValueError(f"{ref}: no such checkpoint, run directory or weights file")
