"""One checkpoint format: DeepSpeed shards plus a meta.json that marks the checkpoint complete.

Layout: <run_dir>/checkpoints/step_00000100/{DeepSpeed files, meta.json}. Every rank writes its shards,
all ranks meet at a barrier, then rank 0 writes meta.json atomically (temp file + rename). A directory
without meta.json is an interrupted write and is never resumed from nor deleted by retention while
it might still be written.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_complete(run_dir: Path) -> Path | None:
    complete = list_complete(run_dir)
    return complete[-1] if complete else None


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def save(engine, run_dir: Path, step: int, meta: dict, client_state: dict, is_rank0: bool,
         after_shards=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    `after_shards(step)` runs between writing the shards and marking them complete (fault drills)."""
    import torch.distributed as dist

    root = checkpoints_root(run_dir)
    tag = step_tag(step)
    ckpt_dir = root / tag
    if is_rank0 and ckpt_dir.exists():
        # A leftover from a killed write at the same step: start it afresh.
        shutil.rmtree(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if after_shards is not None:
        after_shards(step)
    if dist.is_initialized():
        dist.barrier()
    if is_rank0:
        _write_json_atomic(ckpt_dir / META_FILE, {**meta, "step": step, "complete": True})
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir


def load(engine, ckpt_dir: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) in place; returns the saved client state."""
    ckpt_dir = Path(ckpt_dir)
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
    return client_state or {}


def apply_retention(run_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete old complete checkpoints; the newest complete one always survives. Returns deleted dirs."""
    complete = list_complete(run_dir)
    keep = set(complete[-max(keep_last, 1):])
    if keep_every > 0:
        keep |= {p for p in complete if int(_STEP_DIR.match(p.name).group(1)) % keep_every == 0}
    deleted = []
    for path in complete:
        if path not in keep:
            # Remove the completeness mark first: a crash mid-delete leaves an incomplete dir, never a
            # "complete" one with missing shards.
            (path / META_FILE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def load_consolidated(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 model weights from a checkpoint of any ZeRO stage and world size, plus its meta.json."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / META_FILE).is_file():
        raise ValueError(f"{ckpt_dir}: not a complete checkpoint (no {META_FILE})")
    meta = read_meta(ckpt_dir)
    zero_files = list(ckpt_dir.glob("*optim_states.pt"))
    if meta.get("zero_stage", 0) > 0 and zero_files:
        # DeepSpeed narrates its import and the consolidation on stdout (its logger binds sys.stdout when
        # first imported); commands whose stdout is JSON need it on stderr.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        # Our own file (written by this pipeline), so a full unpickle is acceptable here.
        blob = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = blob["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from an untrusted file, without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "allowed global" in str(err):  # torch refused a global: the file wants to run code
            raise ValueError(
                f"{path}: refused to load: it needs more than tensors to unpickle; "
                "convert it to safetensors or a plain state dict"
            ) from None
        raise ValueError(f"{path}: corrupt or not a PyTorch weights file ({err})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated or not a torch file
        raise ValueError(f"{path}: corrupt or not a PyTorch weights file ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(blob).__name__}")
    return {k.removeprefix("module."): v for k, v in blob.items() if isinstance(v, torch.Tensor)}


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
