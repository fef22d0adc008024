"""One input row to one sample. Each kind of dataset (image-text, labelled, zero-shot, retrieval)
differs only in which text or label file sits next to the image; the image path is shared.
Every problem raises RowRejected, which the caller counts."""
from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data_prep.fetch import FetchOptions, fetch_url
from data_prep.images import EncodedImage, ImageOptions, RowRejected, process_image, sha256_hex
from data_prep.writer import Sample
from pipeline.host import usable_cpus

SAMPLE_KINDS = ("image_text", "labelled", "zeroshot", "retrieval")
# Evaluation sets (`data-prep eval-set`): CLIP_benchmark layout, shards named 0.tar, 1.tar, ...
EVAL_KINDS = ("zeroshot", "retrieval")
IMAGE_SOURCES = ("url", "path", "bytes")
# Column the driver adds when --key-col repeats a key; the first occurrence keeps the key.
DUPLICATE_KEY_COL = "__data_prep_duplicate_key"
# Original row number, for inputs that were filtered (train/val split) before partitioning.
SOURCE_ROW_COL = "__data_prep_source_row"
INTERNAL_COLS = (DUPLICATE_KEY_COL, SOURCE_ROW_COL)


# Rows whose image is decoded, resized and encoded at the same time in this process: at most one per core.
# A partition's --threads overlap downloads; more of them in Pillow at once than there are cores only take
# turns at the GIL (Pillow's JPEG encoder holds it) and evict each other's pixels from the caches: 16
# threads in one process on 2 cores, half the context switches and 4-10% less CPU per row with this
# limit, the 2-process command ~3% (RESULTS.md, issue 16). Downloads stay --threads wide. Renewed in a
# forked child (never a parent's semaphore, which a parent's thread may have held at the fork).
_image_slots = threading.BoundedSemaphore(usable_cpus())


def _new_image_slots() -> None:
    global _image_slots
    _image_slots = threading.BoundedSemaphore(usable_cpus())


os.register_at_fork(after_in_child=_new_image_slots)


@dataclass(frozen=True)
class RowSpec:
    """Everything a worker needs to turn rows into samples (plain data: it travels to Ray tasks)."""

    kind: str
    image_col: str
    image_source: str
    caption_col: str | None = None
    label_col: str | None = None
    key_col: str | None = None
    classnames: tuple[str, ...] = ()
    passthrough_cols: tuple[str, ...] = ()
    """Columns copied into each sample's .json (image bytes never are)."""
    image: ImageOptions = field(default_factory=ImageOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)

    def __post_init__(self) -> None:
        assert self.kind in SAMPLE_KINDS and self.image_source in IMAGE_SOURCES


@dataclass(frozen=True)
class RowContext:
    """Where a row came from, for relative paths and for the .json provenance fields."""

    source: str
    base_dir: str
    source_row: int
    key: str


@dataclass
class BuiltRow:
    sample: Sample
    image: EncodedImage
    sha256: str


def build_sample(spec: RowSpec, row: Mapping[str, Any], ctx: RowContext) -> BuiltRow:
    """The sample for one row; cheap checks (caption, label, key) run before any download."""
    if row.get(DUPLICATE_KEY_COL):
        raise RowRejected("duplicate_key", ctx.key)
    text_files = _text_files(spec, row)
    raw = read_image_bytes(spec, row, ctx.base_dir)
    with _image_slots:
        image = process_image(raw, spec.image)
    digest = sha256_hex(raw)
    meta = _metadata(spec, row, ctx, image, digest, text_files)
    files: dict[str, bytes] = {image.ext: image.data}
    files.update({ext: text.encode("utf-8") for ext, text in text_files.items()})
    if spec.kind != "zeroshot":  # CLIP_benchmark's layout is exactly image + cls
        files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return BuiltRow(Sample(ctx.key, files), image, digest)


def _text_files(spec: RowSpec, row: Mapping[str, Any]) -> dict[str, str]:
    if spec.kind == "image_text":
        return {"txt": caption_text(row.get(spec.caption_col))}
    if spec.kind == "retrieval":
        return {"txt": "\n".join(_caption_list(row.get(spec.caption_col)))}
    return {"cls": str(label_index(row.get(spec.label_col), spec.classnames))}


def caption_text(value: Any) -> str:
    """A caption as one clean line of text, or RowRejected."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RowRejected("caption_not_utf8") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowRejected("missing_caption")
    text = str(value).strip()
    if not text:
        raise RowRejected("empty_caption")
    return text


def _caption_list(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    captions = []
    for item in values:
        try:
            captions.append(caption_text(item).replace("\n", " "))
        except RowRejected:
            continue  # one bad caption of several does not cost the image
    if not captions:
        raise RowRejected("missing_caption")
    return captions


def label_index(value: Any, classnames: tuple[str, ...]) -> int:
    """Class index from a class name or an integer label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowRejected("missing_label")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classnames):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    name = str(value).strip()
    if name in classnames:
        return classnames.index(name)
    raise RowRejected("unknown_label", name[:100])


def read_image_bytes(spec: RowSpec, row: Mapping[str, Any], base_dir: str) -> bytes:
    value = row.get(spec.image_col)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowRejected(f"missing_{spec.image_source}")
    if spec.image_source == "url":
        return fetch_url(_as_text(value, "invalid_url").strip(), spec.fetch)
    if spec.image_source == "bytes":
        if isinstance(value, Mapping):  # Hugging Face image struct {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise RowRejected("missing_bytes" if value is None else "not_bytes")
        return bytes(value)
    return _read_file(Path(base_dir) / _as_text(value, "invalid_path"))


def _as_text(value: Any, reason: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RowRejected(reason, "not UTF-8") from None
    return str(value)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RowRejected("missing_file", str(path)) from None
    except IsADirectoryError:
        raise RowRejected("not_a_file", str(path)) from None
    except OSError as exc:
        raise RowRejected("unreadable_file", f"{path}: {exc}") from None


def _metadata(spec: RowSpec, row: Mapping[str, Any], ctx: RowContext, image: EncodedImage,
              digest: str, text_files: Mapping[str, str]) -> dict:
    meta: dict[str, Any] = {}
    for col in spec.passthrough_cols:
        if col != spec.image_col or spec.image_source != "bytes":
            meta[col] = arrow_to_json(row.get(col))
    ours = {
        "key": ctx.key, "source": ctx.source, "source_row": ctx.source_row,
        "original_width": image.original_width, "original_height": image.original_height,
        "width": image.width, "height": image.height, "sha256": digest,
    }
    if "txt" in text_files:
        ours["caption"] = text_files["txt"]
    if "cls" in text_files:
        ours["label"] = int(text_files["cls"])
        ours["classname"] = spec.classnames[int(text_files["cls"])]
    for name in ours:
        if name in meta:  # a pass-through column never silently overwrites provenance
            meta[f"column_{name}"] = meta.pop(name)
    meta.update(ours)
    return meta


def arrow_to_json(value: Any) -> Any:
    """Arrow values as JSON: bytes become a length note, dates ISO strings, NaN null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): arrow_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [arrow_to_json(v) for v in value]
    return str(value)
