"""Evaluation sets on disk: CLIP_benchmark's webdataset layout plus our own data-prep shards.

Layouts read (the first that matches wins):

    DIR/<split>/*.tar            CLIP_benchmark (`clip_benchmark_export_wds`): split folders
    DIR/*.tar                    one flat folder of shards (our `data-prep` labelled output)

Metadata beside the shards, all optional:

    DIR/classnames.txt                           one class name per line, line i = label i
    DIR/zeroshot_classification_templates.txt    one prompt per line with `{c}` for the class name
    DIR/dataset_type.txt                         'retrieval' marks a caption set (CLIP_benchmark)
    DIR/manifest.json (or DIR/<split>/...)       data-prep's manifest: its sha256 goes into results

Samples: KEY.{webp,png,jpg,jpeg} plus KEY.cls (an integer label) or, for retrieval, KEY.txt with one
caption per line (CLIP_benchmark) or KEY.json holding {"captions": [...]}.

Bad samples (missing image or label, undecodable bytes) are counted per reason and travel with the
batches, so the evaluators report how many samples were skipped rather than silently scoring fewer.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds
from PIL import Image

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
MANIFEST_FILE = "manifest.json"

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class Batch:
    """A decoded batch. `images` may hold zero rows when a worker only has skip counts to report."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[list[str]] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    """'shard/key' of each row: worker processes interleave batches, so order-sensitive consumers sort."""
    shard_error: str | None = None
    """'SHARD: problem' when a shard could not be read (truncated, not a tar): raised as a ValueError by the
    main process (see _tar_samples)."""


class BadSample(Exception):
    """A sample that cannot be evaluated; `reason` is the counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


def has_split(data_dir: Path, split: str) -> bool:
    return any((Path(data_dir) / split).glob("*.tar"))


def _read_lines(path: Path) -> list[str]:
    # CLIP_benchmark strips each line; blank lines (a trailing newline) are not classes or prompts.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_manifest(data_dir: Path, split: str = "test") -> dict | None:
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
    manifest = read_manifest(data_dir, split)
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
    manifest = read_manifest(data_dir, split)
    if manifest and manifest.get("kind") == "retrieval":
        return "retrieval"
    return "classification"


def count_samples(data_dir: Path, split: str = "test") -> int | None:
    """Sample count for the progress bar, when a manifest records it."""
    manifest = read_manifest(data_dir, split)
    return int(manifest["num_samples"]) if manifest and "num_samples" in manifest else None


# -- decoding ---------------------------------------------------------------------------------------


def _image(sample: dict, transform: Transform) -> torch.Tensor:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    return transform(img.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError):
                raise BadSample(f"undecodable {ext}") from None
    raise BadSample("no image")


def _label(sample: dict) -> int:
    if "cls" not in sample:
        raise BadSample("no cls")
    try:
        return int(sample["cls"].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("cls not an integer") from None


def _captions(sample: dict) -> list[str]:
    if "txt" in sample:
        captions = [c.strip() for c in sample["txt"].decode("utf-8", "replace").splitlines()]
    elif "json" in sample:
        try:
            captions = [str(c).strip() for c in json.loads(sample["json"]).get("captions", [])]
        except (ValueError, AttributeError):
            raise BadSample("json unreadable") from None
    else:
        raise BadSample("no txt or json captions")
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("no captions")
    return captions


def _decode_labelled(sample: dict, transform: Transform) -> tuple[torch.Tensor, int]:
    return _image(sample, transform), _label(sample)


def _decode_captioned(sample: dict, transform: Transform) -> tuple[torch.Tensor, list[str]]:
    return _image(sample, transform), _captions(sample)


def _collate(items: list, skipped: Counter, with_labels: bool) -> Batch:
    images = torch.stack([image for _, image, _ in items]) if items else torch.empty(0)
    batch = Batch(images=images, skipped=dict(skipped), keys=[key for key, _, _ in items])
    if with_labels:
        batch.labels = torch.tensor([target for _, _, target in items], dtype=torch.long)
    else:
        batch.captions = [target for _, _, target in items]
    return batch


def _batches(samples: Iterable[dict], decode: Callable, batch_size: int, with_labels: bool) -> Iterator[Batch]:
    items: list = []
    skipped: Counter = Counter()
    for sample in samples:
        if _SHARD_ERROR in sample:
            yield Batch(images=torch.empty(0), shard_error=sample[_SHARD_ERROR])
            return
        try:
            key = f"{Path(sample.get('__url__', '')).name}/{sample.get('__key__')}"
            items.append((key, *decode(sample)))
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        if len(items) == batch_size:
            yield _collate(items, skipped, with_labels)
            items, skipped = [], Counter()
    if items or skipped:
        yield _collate(items, skipped, with_labels)


_SHARD_ERROR = "__shard_error__"


def _tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """webdataset's tar reader, shard by shard. A shard that cannot be read ends the stream with one sample
    naming it and the problem: raised inside a loader worker, the error would reach the console as the
    worker's traceback instead of one line."""
    for shard in shards:
        try:
            yield from wds.tarfile_to_samples()(iter([shard]))
        except (tarfile.TarError, EOFError, OSError) as err:
            # webdataset appends " @ <stream>" to the reason, and the stream and url as further args.
            reason = str(err.args[0]).split(" @ ", 1)[0] if err.args else type(err).__name__
            problem = (f"truncated tar shard ({reason})" if reason == "unexpected end of data"
                       else f"corrupt shard or not a tar file ({reason})")
            yield {_SHARD_ERROR: f"{shard['url']}: {problem}; re-create it or move it out of the folder"}
            return


class _Batches:
    """The loader's batches, each checked in the main process: a shard that could not be read stops the
    evaluation with a ValueError naming it (the launcher prints it as one line)."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if batch.shard_error:
                raise ValueError(batch.shard_error)
            yield batch


def _loader(shards: list[Path], decode: Callable, batch_size: int, num_workers: int, with_labels: bool):
    # Batching happens inside the pipeline (each worker batches its own shards), so the DataLoader
    # passes Batch objects through untouched (batch_size=None). More workers than shards would idle.
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(s) for s in shards]),
        wds.split_by_worker,
        _tar_samples,
        partial(_batches, decode=decode, batch_size=batch_size, with_labels=with_labels),
    )
    workers = min(num_workers, len(shards))
    return _Batches(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                                persistent_workers=False))


def labelled_batches(shards: list[Path], transform: Transform, batch_size: int, num_workers: int):
    """Batches of (image, integer label) for classification tasks."""
    return _loader(shards, partial(_decode_labelled, transform=transform), batch_size, num_workers, True)


def captioned_batches(shards: list[Path], transform: Transform, batch_size: int, num_workers: int):
    """Batches of (image, several captions) for retrieval."""
    return _loader(shards, partial(_decode_captioned, transform=transform), batch_size, num_workers, False)
