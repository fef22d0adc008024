"""Checkpoints, run directories and weights files in a bucket, as local copies the usual code reads.

`launch eval`, `launch export`, `launch soup`, `launch report`, `distill.teacher` and `model.pretrained_path`
take s3:// and gs:// references to run directories, checkpoints, exported folders (open_clip-dir, timm-dir, soups)
and weights files (https:// for weights files): the reference is copied to $RESCLIP_CACHE/refs/<hash of the
URL>/ (reused while the bucket's objects keep their ETags) and the copy goes down the local code path, so a
remote checkpoint is loaded exactly as safely (weights-only) as a local one. `load_weights_file` reads a weights
file wherever it is.
"""
from __future__ import annotations

import posixpath
import shutil
from pathlib import Path

import torch

from pipeline import checkpoint, storage
from pipeline.run_mirror import FETCH_RECORD, fetch_folder, fetch_latest, fresh_fs, listing

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files read as weights: a reference ending so is a weights file; a folder holding one is an export."""


def localize(url: str) -> Path:
    """A local copy of a remote checkpoint folder, run directory (its record and newest complete checkpoint) or
    weights file. ValueError (one line) when there is nothing of the kind there or the bucket cannot be read."""
    return _localized(url, with_checkpoint=True)


def localize_run_record(url: str) -> Path:
    """A local copy of a remote run directory's record (metrics.jsonl, configs, final metrics, eval/ results),
    without its checkpoints: what `launch report` reads."""
    return _localized(url, with_checkpoint=False)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from an untrusted file (local, or s3:// / gs:// / https:// copied to a local cache first),
    without executing pickled code."""
    path = localize(str(path)) if storage.is_remote(path) else Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    blob = checkpoint.safe_torch_load(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(blob).__name__}")
    return {k.removeprefix("module."): v for k, v in blob.items() if isinstance(v, torch.Tensor)}


def _localized(url: str, with_checkpoint: bool) -> Path:
    base = storage.cache_root() / "refs" / storage.url_digest(url)
    name = posixpath.basename(url.rstrip("/"))
    try:
        if storage.scheme(url) in ("http", "https"):  # no listings: a weights file
            return _fetch_file(url, base / name)
        files = listing(url)
        if not files:
            fs, inner = fresh_fs(url)
            if fs.isfile(inner):
                return _fetch_file(url, base / name)
            raise ValueError(f"{url}: no such checkpoint, run directory or weights file")
        top = {n: info for n, info in files.items() if "/" not in n}
        if checkpoint.META_FILE in files:
            return fetch_folder(url, top, base / name)
        if any(n.startswith("checkpoints/") for n in files) or "metrics.jsonl" in files:
            return _fetch_run(url, files, base / name, with_checkpoint)
        if any(posixpath.splitext(n)[1] in WEIGHT_SUFFIXES for n in top):  # an exported folder or a soup:
            return fetch_folder(url, top, base / name)  # the resolver checks its layout on the copy
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp/gcsfs raise many types: one line whatever it is
        raise storage.StorageError(f"{url}: cannot read it ({storage.describe(err)}); check the bucket name, "
                                   "AWS_ENDPOINT_URL and the credentials") from None
    raise ValueError(f"{url}: not a run directory (no checkpoints/), a checkpoint (no meta.json) nor an exported "
                     f"folder (no weights file)")


def _fetch_run(url: str, files: dict[str, dict], local: Path, with_checkpoint: bool) -> Path:
    """A run directory's record (top-level files, eval/ results) and, if asked, its newest complete checkpoint."""
    record = {n: info for n, info in files.items() if "/" not in n or n.startswith("eval/")}
    fetch_folder(url, record, local / ".record")
    for path in (local / ".record").rglob("*"):
        if path.is_file() and path.name != FETCH_RECORD:
            target = local / path.relative_to(local / ".record")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    if with_checkpoint:
        checkpoint.checkpoints_root(local).mkdir(parents=True, exist_ok=True)
        fetch_latest(url, local)
    return local


def _fetch_file(url: str, target: Path) -> Path:
    """A remote file at `target` (kept when its record says it is this object already)."""
    fs, inner = fresh_fs(url)
    info = fs.info(inner)
    fetch_folder(posixpath.dirname(url), {posixpath.basename(inner): info}, target.parent)
    return target
