"""Resolve a shard spec to a list of shards with sample counts.

Counts come from our manifest.json, open_clip's sizes.json or timm's _info.json, in that order; only
when a folder has none of them are the tars scanned (cheap for small sets, slow for big ones).
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    path: str
    num_samples: int


def resolve_shards(spec: str) -> list[Shard]:
    """'dir', 'glob*', 'brace{000..009}.tar', or several joined with '::'. Raises ValueError."""
    shards: list[Shard] = []
    for part in filter(None, (p.strip() for p in spec.split("::"))):
        shards.extend(_resolve_one(part))
    if not shards:
        raise ValueError(f"no shards found for {spec!r}")
    return shards


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _resolve_one(part: str) -> list[Shard]:
    if os.path.isdir(part):
        return _from_folder(Path(part))
    if "{" in part:
        paths = list(braceexpand.braceexpand(part))
    else:
        paths = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"shard file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not paths:
        raise ValueError(f"no shard files match {part!r}")
    counts = _known_counts(Path(paths[0]).parent)
    return [Shard(p, counts.get(os.path.basename(p)) or count_samples(p)) for p in paths]


def _from_folder(folder: Path) -> list[Shard]:
    manifest = read_manifest(folder)
    if manifest is not None:
        return [Shard(str(folder / s["name"]), int(s["num_samples"])) for s in manifest["shards"]]
    paths = sorted(str(p) for p in folder.glob("*.tar"))
    if not paths:
        raise ValueError(f"{folder}: no .tar shards and no {MANIFEST}")
    counts = _known_counts(folder)
    return [Shard(p, counts.get(os.path.basename(p)) or count_samples(p)) for p in paths]


def _known_counts(folder: Path) -> dict[str, int]:
    sizes = folder / "sizes.json"  # open_clip / img2dataset convention
    if sizes.is_file():
        return {os.path.basename(k): int(v) for k, v in json.loads(sizes.read_text()).items()}
    info = folder / "_info.json"  # timm's reader_wds convention
    if info.is_file():
        counts: dict[str, int] = {}
        for split in json.loads(info.read_text()).get("splits", {}).values():
            for name, n in zip(split.get("filenames", []), split.get("shard_lengths", [])):
                counts.update({os.path.basename(f): int(n) for f in braceexpand.braceexpand(name)})
        return counts
    return {}


def count_samples(path: str) -> int:
    """Distinct sample keys in a tar (webdataset's key = path up to the first dot of the basename)."""
    keys = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile() and not os.path.basename(member.name).startswith("__"):
                    dirname, base = os.path.split(member.name)
                    keys.add(os.path.join(dirname, base.split(".", 1)[0]))
    except (OSError, tarfile.TarError) as err:
        raise ValueError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from None
    return len(keys)
