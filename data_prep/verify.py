"""`data-prep verify DIR`: re-read every shard and compare it with the manifest."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from data_prep.manifest import MANIFEST_NAME, SIZES_NAME, checked_manifest
from pipeline.data.reader import IMAGE_EXTENSIONS

# Files each sample must hold, by dataset kind (any one image extension will do).
_REQUIRED = {"labelled": {"cls"}, "zeroshot": {"cls"}, "image_text": {"txt"}, "retrieval": {"txt"}}


def find_datasets(root: Path) -> list[Path]:
    """`root` itself when it holds a manifest, else every folder below it that does."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    found = sorted(p.parent for p in root.rglob(MANIFEST_NAME))
    if not found:
        raise ValueError(f"{root}: no {MANIFEST_NAME} here or below (not a data-prep output?)")
    return found


def verify_dataset(folder: Path) -> list[str]:
    """Every mismatch between `folder`'s shards and its manifest, as readable lines."""
    manifest = checked_manifest(folder)
    problems: list[str] = []
    listed = [s["name"] for s in manifest["shards"]]
    on_disk = sorted(p.name for p in folder.glob("*.tar"))
    for name in sorted(set(on_disk) - set(listed)):
        problems.append(f"{folder / name}: shard on disk but not in the manifest")
    for name in sorted(p.name for p in folder.glob("*.partial")):
        problems.append(f"{folder / name}: unfinished write left behind (job interrupted?)")
    keys: set[str] = set()
    for shard in manifest["shards"]:
        problems.extend(_verify_shard(folder, shard, manifest["kind"], keys))
    total = sum(s["num_samples"] for s in manifest["shards"])
    if total != manifest["num_samples"]:
        problems.append(f"{folder}: shard counts add up to {total}, manifest says {manifest['num_samples']}")
    problems.extend(_verify_sizes(folder, manifest))
    return problems


def _verify_shard(folder: Path, shard: dict, kind: str, keys: set[str]) -> list[str]:
    path = folder / shard["name"]
    if not path.is_file():
        return [f"{path}: listed in the manifest but missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != shard["num_bytes"]:
        problems.append(f"{path}: {len(data)} bytes, manifest says {shard['num_bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    try:
        samples = _read_samples(path)
    except (tarfile.TarError, OSError, ValueError) as exc:
        return problems + [f"{path}: unreadable tar ({exc})"]
    if len(samples) != shard["num_samples"]:
        problems.append(f"{path}: {len(samples)} samples, manifest says {shard['num_samples']}")
    for key, exts in samples.items():
        if key in keys:
            problems.append(f"{path}: key {key!r} also appears in an earlier shard")
        keys.add(key)
        missing = _REQUIRED.get(kind, set()) - exts
        if missing or not exts & set(IMAGE_EXTENSIONS):
            problems.append(f"{path}: sample {key!r} lacks {sorted(missing) or 'an image'}")
    return problems


def _read_samples(path: Path) -> dict[str, set[str]]:
    samples: dict[str, set[str]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            exts = samples.setdefault(key, set())
            if ext in exts:
                raise ValueError(f"duplicate member {member.name}")
            exts.add(ext)
    return samples


def _verify_sizes(folder: Path, manifest: dict) -> list[str]:
    path = folder / SIZES_NAME
    if not path.is_file():
        return [f"{path}: missing"]
    expected = {s["name"]: s["num_samples"] for s in manifest["shards"]}
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: unreadable ({exc})"]
    return [] if sizes == expected else [f"{path}: does not match the manifest's shard counts"]
