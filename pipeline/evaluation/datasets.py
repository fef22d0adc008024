"""Evaluation sets on disk: CLIP_benchmark's webdataset layout plus our own data-prep shards.

Layouts read (the first that matches wins):

    DIR/<split>/*.tar            CLIP_benchmark (`clip_benchmark_export_wds`): split folders
    DIR/*.tar                    one flat folder of shards (our `data-prep` labelled output)

Metadata beside the shards, all optional:

    DIR/classnames.txt                           one class name per line, line i = label i
    DIR/zeroshot_classification_templates.txt    one prompt per line with `{c}` for the class name
    DIR/dataset_type.txt                         'retrieval' marks a caption set (CLIP_benchmark)
    DIR/manifest.json (or DIR/<split>/...)       data-prep's manifest: its sha256 goes into results

Samples: an image (pipeline.data.reader.IMAGE_EXTENSIONS) plus KEY.cls (an integer label) or, for
retrieval, KEY.txt with one caption per line (CLIP_benchmark) or KEY.json holding {"captions": [...]}.
They are read, decoded and their skips counted by pipeline.data (eval_batches.py), as in training; this
module only says where a split's shards are and what the metadata beside them says.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.data.shards import Shard, resolve_shards

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
MANIFEST_FILE = "manifest.json"


def find_shards(data_dir: Path, split: str) -> list[Path]:
    """Shards of `split`: DIR/<split>/*.tar, else the flat DIR/*.tar."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: no such evaluation data folder")
    split_dir = data_dir / split
    shards = sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []
    if not shards:
        shards = sorted(data_dir.glob("*.tar"))
    if not shards:
        raise ValueError(f"{data_dir}: no .tar shards in {split_dir} or in the folder itself")
    return shards


def split_shards(data_dir: Path, split: str) -> list[Shard]:
    """The shards of `split` with their sample counts (pipeline.data.shards: the folder's manifest or
    sizes.json, else a scan that names an unreadable shard in a ValueError)."""
    return resolve_shards(str(find_shards(data_dir, split)[0].parent))


def has_split(data_dir: Path, split: str) -> bool:
    return any((Path(data_dir) / split).glob("*.tar"))


def _read_lines(path: Path) -> list[str]:
    # CLIP_benchmark strips each line; blank lines (a trailing newline) are not classes or prompts.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_set_manifest(data_dir: Path, split: str = "test") -> dict | None:
    """The set's manifest.json (in DIR, else DIR/<split>), or None; ValueError when it cannot be read."""
    path = manifest_path(data_dir, split)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None


def manifest_path(data_dir: Path, split: str = "test") -> Path | None:
    for path in (Path(data_dir) / MANIFEST_FILE, Path(data_dir) / split / MANIFEST_FILE):
        if path.is_file():
            return path
    return None


def manifest_sha256(data_dir: Path, split: str = "test") -> str | None:
    path = manifest_path(data_dir, split)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else None


def read_classnames(data_dir: Path, split: str = "test") -> list[str] | None:
    """classnames.txt, else the manifest's `classnames`, else None."""
    path = Path(data_dir) / CLASSNAMES_FILE
    if path.is_file():
        return _read_lines(path)
    manifest = eval_set_manifest(data_dir, split)
    if manifest and manifest.get("classnames"):
        return list(manifest["classnames"])
    return None


def read_templates(data_dir: Path) -> list[str] | None:
    path = Path(data_dir) / TEMPLATES_FILE
    if not path.is_file():
        return None
    templates = _read_lines(path)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"{path}: every template needs a '{{c}}' placeholder, e.g. {bad[0]!r}")
    return templates


def dataset_type(data_dir: Path, split: str = "test") -> str:
    """'retrieval' or 'classification', from dataset_type.txt or the manifest's kind."""
    path = Path(data_dir) / DATASET_TYPE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip().lower()
    manifest = eval_set_manifest(data_dir, split)
    if manifest and manifest.get("kind") == "retrieval":
        return "retrieval"
    return "classification"


def listed_num_samples(data_dir: Path, split: str = "test") -> int | None:
    """The sample count the set's manifest records (for the progress bar and the shortfall check), or None."""
    manifest = eval_set_manifest(data_dir, split)
    return int(manifest["num_samples"]) if manifest and "num_samples" in manifest else None
