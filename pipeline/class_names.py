"""Class lists compared by name: what a labelled set's manifest and a classifier's checkpoint record.

A label is an index into a class list. Two sets whose lists differ (another order, a subset) make the same
index mean two classes, and scoring one against a model trained on the other gives a plausible-looking,
wrong number. Every stage that pairs labels with a model's outputs asks `map_by_name`: identical lists
pass, a reorder or a subset of the model's classes is mapped by name (with a one-line note the caller
prints), and names the model does not know are an error. Unknown lists (no manifest records them) are not
compared: there is nothing to compare.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch

from pipeline import storage

CHECKPOINT_KEY = "class_names"
"""meta.json key of a classifier checkpoint: its training manifest's class names, output i = name i."""
MANIFEST_KEY = "classnames"
"""data-prep's manifest key (data_prep/manifest.py)."""
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class LabelMap:
    """Data label i -> model class `targets[i]`; `targets` None = the identity (same list, same order)."""

    targets: tuple[int, ...] | None = None
    note: str = ""
    """One line saying what was mapped, for the console and the result; empty for the identity."""

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return labels
        if len(labels) and (int(labels.max()) >= len(self.targets) or int(labels.min()) < 0):
            raise ValueError(f"a sample's label {int(labels.max())} is outside the {len(self.targets)} classes "
                             "its manifest lists")
        return torch.tensor(self.targets, dtype=torch.long)[labels.long()]


def map_by_name(data_names: list[str] | None, model_names: list[str] | None, data_what: str,
                model_what: str) -> LabelMap:
    """How labels of `data_names` become outputs of `model_names`; ValueError when a name has no output.

    `data_what` / `model_what` say where each list comes from, for the messages."""
    if not data_names or not model_names or list(data_names) == list(model_names):
        return LabelMap()
    for names, what in ((data_names, data_what), (model_names, model_what)):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ValueError(f"{what}: class names repeat ({_quoted(repeated)}), so labels cannot be matched by name")
    index = {name: i for i, name in enumerate(model_names)}
    unknown = [name for name in data_names if name not in index]
    if unknown:
        raise ValueError(f"{data_what}: {len(unknown)} of its {len(data_names)} class names are not among the "
                         f"{len(model_names)} classes of {model_what} ({_quoted(unknown)}): its labels cannot be "
                         "scored against this model")
    targets = tuple(index[name] for name in data_names)
    if len(data_names) == len(model_names):
        note = (f"{data_what} lists the same {len(data_names)} classes as {model_what} in another order: "
                "labels mapped to the model's classes by name")
    else:
        note = (f"{data_what} holds {len(data_names)} of the {len(model_names)} classes of {model_what}: "
                "labels mapped to the model's classes by name")
    return LabelMap(targets, note)


def manifest_class_names(spec: str) -> list[str] | None:
    """The class names recorded beside a data spec's shards (a folder, a glob, a brace pattern, several joined
    by '::'); None when no manifest records any. ValueError when two sources of one spec disagree."""
    found: list[tuple[str, list[str]]] = []
    for part in filter(None, (p.strip() for p in spec.split("::"))):
        folder = _shard_folder(part)
        manifest = _read(folder) if folder else None
        names = manifest.get(MANIFEST_KEY) if isinstance(manifest, dict) else None
        if names:
            found.append((folder, [str(n) for n in names]))
    for folder, names in found[1:]:
        if names != found[0][1]:
            raise ValueError(f"{spec}: the class names of {folder} differ from those of {found[0][0]}: "
                             "sources mixed into one set must share one class list")
    return found[0][1] if found else None


def checkpoint_class_names(meta: dict) -> tuple[list[str] | None, str]:
    """(class names, where from) of a classifier checkpoint: what its meta.json records, else (checkpoints
    written before it was recorded) its training manifest when that is still there."""
    names = meta.get(CHECKPOINT_KEY)
    if names:
        return [str(n) for n in names], "meta.json"
    train = ((meta.get("config") or {}).get("data") or {}).get("train") or ""
    try:
        names = manifest_class_names(train) if train else None
    except (OSError, ValueError):
        names = None
    return names, (f"its training manifest ({train})" if names else "")


def model_class_names(path: str | Path, run_config: dict | None) -> tuple[list[str] | None, str]:
    """(class names, where from) of a resolved model: `path` is one of our checkpoint directories (its
    meta.json), else a file whose run config (our exports) names its training set."""
    meta_path = storage.join(path, "meta.json")
    meta: dict = {"config": run_config or {}}
    if storage.is_file(meta_path):
        try:
            meta = json.loads(storage.read_text(meta_path))
        except (OSError, ValueError):  # an unreadable record names no classes; the resolver reports it
            meta = {}
    names, where = checkpoint_class_names(meta if isinstance(meta, dict) else {})
    return names, (meta_path if where == "meta.json" else where)


def _shard_folder(part: str) -> str | None:
    """The folder whose manifest describes a spec part: the folder itself, or the one its shards are in."""
    if storage.is_dir(part):
        return part
    if "{" in part:
        first = next(iter(braceexpand.braceexpand(part)), None)
    elif any(c in part for c in "*?["):
        first = next(iter(storage.glob(part)), None)
    else:
        first = part
    return posixpath.dirname(first.rstrip("/")) if first else None


def _read(folder: str) -> dict | None:
    """The manifest of `folder`; None when there is none or it cannot be read (preflight reports shards it
    cannot read; a class list nobody can read is one there is nothing to compare with)."""
    path = storage.join(folder, MANIFEST_FILE)
    try:
        return json.loads(storage.read_text(path)) if storage.is_file(path) else None
    except (OSError, ValueError):  # StorageError and JSONDecodeError are ValueErrors
        return None


def _quoted(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

