"""Export resolved weights to files open_clip and timm load without edits.

  open_clip    weights (.bin/.pt or .safetensors) for
               open_clip.create_model_and_transforms(NAME, pretrained=PATH); for architectures
               open_clip does not ship, NAME.json is written beside it (open_clip.add_model_config(it)).
  timm         weights for timm.create_model(NAME, checkpoint_path=PATH, num_classes=N); our own tiny
               architectures (resnet_tiny, resnet_nano) after `import pipeline.models`, which registers them.
  safetensors  the weights plus the same record, for any architecture.
  open_clip-dir, timm-dir
               a folder in the library's hub layout (the family's `hub_folder`): its config file and
               safetensors weights, loaded by the library alone with open_clip.create_model_and_transforms(
               "local-dir:DIR") / timm.create_model("local-dir:DIR", pretrained=True), eval transform included.

The library formats are the model families' (pipeline.families: `library`, `export_files`, `hub_folder`).

Every file records what it holds (architecture, the run's config, step, weights hash): as safetensors
metadata, or in a .bin/.pt/.pth as {"state_dict": weights, "metadata": {...}}, the checkpoint layout
timm's and open_clip's loaders unwrap themselves. So `launch eval` reads every export back without
--model, with the source checkpoint's eval transform and numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import families
from pipeline.class_names import model_class_names
from pipeline.config import Config
from pipeline.evaluation.resolver import (META_CONFIG, META_LIBRARY, META_MODEL, META_RUN_CONFIG, META_STEP,
                                          WEIGHT_SUFFIXES, ResolvedModel, state_dict_sha256)


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors sharing storage, and a fresh copy is cheap next to the write.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _write_weights(state: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        save_file(state, str(output), metadata=metadata)
    else:
        torch.save({"state_dict": state, "metadata": metadata}, output)


def _metadata(resolved: ResolvedModel, state: dict[str, torch.Tensor]) -> dict[str, str]:
    meta = {"format": "pt", META_LIBRARY: resolved.library, META_MODEL: resolved.model_name,
            "resclip.content_sha256": state_dict_sha256(state)}
    if resolved.model_config is not None:
        meta[META_CONFIG] = json.dumps(resolved.model_config)
    if resolved.run_config is not None:
        meta[META_RUN_CONFIG] = json.dumps(resolved.run_config)
    if resolved.step is not None:
        meta[META_STEP] = str(resolved.step)
    return meta


def folder_formats() -> dict[str, families.ModelFamily]:
    """The formats whose --output is a folder (each family's library hub layout) -> their family."""
    return {f.hub_folder.format: f for f in families.all_families() if f.hub_folder is not None}


def export_formats() -> list[str]:
    """Each model family's library (files that library loads by architecture name), the folder formats,
    then 'safetensors'."""
    return [*(family.library for family in families.all_families()), *folder_formats(), "safetensors"]


def _export_folder(resolved: ResolvedModel, fmt: str, family: families.ModelFamily, output: Path) -> list[Path]:
    if family.name != resolved.kind:
        own = families.get(resolved.kind).hub_folder
        other = f"--format {own.format}" if own is not None else "another format"
        raise ValueError(f"--format {fmt}: {resolved.model_name} is a {resolved.library} architecture; use {other}")
    if output.suffix in WEIGHT_SUFFIXES or output.is_file():
        raise ValueError(f"--format {fmt}: --output {output} must be a folder (the library's hub layout), "
                         "not a weights file")
    run_config = Config.from_dict(resolved.run_config) if resolved.run_config is not None else None
    class_names, _ = model_class_names(resolved.path, resolved.run_config)
    layout = family.hub_folder
    config = layout.config(resolved.model, resolved.model_name, resolved.model_config, run_config, class_names)
    output.mkdir(parents=True, exist_ok=True)
    state = _plain_state(resolved.model)
    _write_weights(state, output / layout.weights_file, _metadata(resolved, state))
    (output / layout.config_file).write_text(json.dumps(config, indent=2) + "\n")
    return [output / layout.weights_file, output / layout.config_file]


def export(resolved: ResolvedModel, fmt: str, output: Path) -> list[Path]:
    """Write `resolved`'s weights as `fmt`; returns the files written, the weights first."""
    output = Path(output)
    formats = export_formats()
    if fmt not in formats:
        raise ValueError(f"--format {fmt}: unknown export format (valid: {', '.join(formats)})")
    folders = folder_formats()
    if fmt in folders:
        return _export_folder(resolved, fmt, folders[fmt], output)
    if output.suffix not in WEIGHT_SUFFIXES or (fmt == "safetensors" and output.suffix != ".safetensors"):
        valid = ".safetensors" if fmt == "safetensors" else ", ".join(WEIGHT_SUFFIXES)
        raise ValueError(f"--format {fmt}: --output {output} must end in {valid}")
    extras: list[Path] = []
    if fmt != "safetensors":
        if resolved.library != fmt:
            raise ValueError(f"--format {fmt}: {resolved.model_name} is a {resolved.library} architecture; "
                             f"use --format {resolved.library} or safetensors")
        # The library's own files first: a library that cannot load this architecture by name refuses here.
        extras = families.get(resolved.kind).export_files(resolved.model_name, resolved.model_config, output)
    state = _plain_state(resolved.model)
    _write_weights(state, output, _metadata(resolved, state))
    return [output, *extras]
