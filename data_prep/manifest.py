"""Dataset metadata written next to the shards: our manifest.json plus the size files that
open_clip (`sizes.json`) and timm's webdataset reader (`_info.json`) read, so both can train on
our shards unchanged. manifest.json is written last: its presence marks a finished dataset."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

from data_prep import __version__
from data_prep.writer import ShardRecord, write_bytes_atomic

MANIFEST_FORMAT = "resclip-shards/1"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
TIMM_INFO_NAME = "_info.json"
DATASET_KINDS = ("labelled", "image_text", "zeroshot", "retrieval")


def build_manifest(kind: str, shards: Sequence[ShardRecord], *, source: Mapping,
                   options: Mapping, rejected: Mapping[str, int] | None = None,
                   classnames: Sequence[str] | None = None) -> dict:
    """The manifest dict; `classnames` is required for labelled and zero-shot sets."""
    assert kind in DATASET_KINDS, kind
    manifest: dict = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "num_samples": sum(s.num_samples for s in shards),
        "num_bytes": sum(s.num_bytes for s in shards),
        "shards": [s.to_json() for s in shards],
    }
    if classnames is not None:
        manifest["classnames"] = list(classnames)
        manifest["num_classes"] = len(classnames)
    manifest.update({
        "rejected": dict(sorted((rejected or {}).items())),
        "source": dict(source),
        "options": dict(options),
        "tool_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    return manifest


def timm_split_info(split: str, shards: Sequence[ShardRecord], prefix: str = "") -> dict:
    """One split entry of timm's `_info.json` (timm.data.readers.reader_wds._parse_split_info)."""
    return {
        "name": split,
        "num_samples": sum(s.num_samples for s in shards),
        "filenames": [prefix + s.name for s in shards],
        "shard_lengths": [s.num_samples for s in shards],
    }


def write_dataset_metadata(out_dir: Path, manifest: dict, *, split: str, dataset_name: str) -> None:
    """Write sizes.json, _info.json and (last) manifest.json into the shard folder."""
    shards = [ShardRecord(**s) for s in manifest["shards"]]
    sizes = {s.name: s.num_samples for s in shards}
    _write_json(out_dir / SIZES_NAME, sizes)
    info = {"name": dataset_name, "splits": {split: timm_split_info(split, shards)}}
    if "num_classes" in manifest:
        info["num_classes"] = manifest["num_classes"]
    _write_json(out_dir / TIMM_INFO_NAME, info)
    _write_json(out_dir / MANIFEST_NAME, manifest)


def write_parent_timm_info(parent: Path, dataset_name: str, splits: Mapping[str, dict]) -> None:
    """`_info.json` one level up that names every split folder (`--data-dir parent` in timm)."""
    info: dict = {"name": dataset_name, "splits": {}}
    for split, manifest in splits.items():
        shards = [ShardRecord(**s) for s in manifest["shards"]]
        info["splits"][split] = timm_split_info(split, shards, prefix=f"{split}/")
        if "num_classes" in manifest:
            info["num_classes"] = manifest["num_classes"]
    _write_json(parent / TIMM_INFO_NAME, info)


def checked_manifest(out_dir: Path) -> dict:
    """A data-prep output folder's manifest, checked: ValueError names the file when it is missing, unreadable or
    of another format. (pipeline.data.shards.read_manifest is the lenient reader the trainer uses.)"""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no manifest (not a data-prep output folder, or unfinished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def is_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / MANIFEST_NAME).is_file()


def _write_json(path: Path, value: object) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
