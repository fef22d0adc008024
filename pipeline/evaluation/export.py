"""Export resolved weights to files open_clip and timm load without edits.

  open_clip    weights (.bin/.pt or .safetensors) for
               open_clip.create_model_and_transforms(NAME, pretrained=PATH); for architectures
               open_clip does not ship, NAME.json is written beside it (open_clip.add_model_config(it)).
  timm         weights for timm.create_model(NAME, checkpoint_path=PATH, num_classes=N); our own tiny
               architectures (resnet_tiny, resnet_nano) after `import pipeline.models`, which registers them.
  safetensors  the weights plus the same record, for any architecture.

Every file records what it holds (architecture, the run's config, step, weights hash): as safetensors
metadata, or in a .bin/.pt/.pth as {"state_dict": weights, "metadata": {...}}, the checkpoint layout
timm's and open_clip's loaders unwrap themselves. So `launch eval` reads every export back without
--model, with the source checkpoint's eval transform and numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import open_clip
import timm
import torch
from safetensors.torch import save_file

from pipeline.evaluation.resolver import (META_CONFIG, META_LIBRARY, META_MODEL, META_RUN_CONFIG, META_STEP,
                                          ResolvedModel, state_dict_sha256)

_OPEN_CLIP_BUILTIN_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors sharing storage, and a fresh copy is cheap next to the write.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _write_weights(state: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        save_file(state, str(output), metadata=metadata)
    elif output.suffix in (".bin", ".pt", ".pth"):
        torch.save({"state_dict": state, "metadata": metadata}, output)
    else:
        raise ValueError(f"--output {output}: use a .safetensors, .bin, .pt or .pth file name")


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


def _require_library(resolved: ResolvedModel, library: str) -> None:
    if resolved.library != library:
        raise ValueError(f"--format {library}: {resolved.model_name} is a {resolved.library} architecture; "
                         f"use --format {resolved.library} or safetensors")


def export_open_clip(resolved: ResolvedModel, output: Path) -> list[Path]:
    _require_library(resolved, "open_clip")
    state = _plain_state(resolved.model)
    _write_weights(state, output, _metadata(resolved, state))
    written = [output]
    if not (_OPEN_CLIP_BUILTIN_CONFIGS / f"{resolved.model_name}.json").is_file():
        if resolved.model_config is None:
            raise ValueError(f"{resolved.model_name}: no open_clip config known for this architecture")
        config_path = output.parent / f"{resolved.model_name}.json"
        config_path.write_text(json.dumps(resolved.model_config, indent=2) + "\n")
        written.append(config_path)
    return written


def export_timm(resolved: ResolvedModel, output: Path) -> list[Path]:
    _require_library(resolved, "timm")
    if not timm.is_model(resolved.model_name):
        raise ValueError(
            f"--format timm: {resolved.model_name} is not a timm-registered architecture, so "
            "timm.create_model cannot build it by name; use --format safetensors"
        )
    state = _plain_state(resolved.model)
    _write_weights(state, output, _metadata(resolved, state))
    return [output]


def export_safetensors(resolved: ResolvedModel, output: Path) -> list[Path]:
    if output.suffix != ".safetensors":
        raise ValueError(f"--format safetensors: --output {output} must end in .safetensors")
    state = _plain_state(resolved.model)
    _write_weights(state, output, _metadata(resolved, state))
    return [output]


EXPORTERS: dict[str, Callable[[ResolvedModel, Path], list[Path]]] = {
    "open_clip": export_open_clip,
    "timm": export_timm,
    "safetensors": export_safetensors,
}


def export(resolved: ResolvedModel, fmt: str, output: Path) -> list[Path]:
    """Write `resolved`'s weights as `fmt`; returns the files written."""
    if fmt not in EXPORTERS:
        raise ValueError(f"--format {fmt}: unknown export format (valid: {', '.join(EXPORTERS)})")
    return EXPORTERS[fmt](resolved, Path(output))
