"""One partition of input rows -> one shard plus its stats parquet (runs locally or as a Ray task).

A partition is complete once its stats file exists. The stats file is written after the tar, and
both are renamed into place, so re-running a job redoes exactly the partitions that never finished."""
from __future__ import annotations

import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.images import RowRejected
from data_prep.rows import SOURCE_ROW_COL, BuiltRow, RowContext, RowSpec, build_sample
from data_prep.writer import Sample, ShardRecord, shard_name, write_shard

STATS_SUFFIX = ".stats.parquet"
OK = "ok"
_SHARD_META_KEY = b"data_prep_shard"
_STATS_SCHEMA = pa.schema([
    ("row", pa.int64()), ("source", pa.string()), ("source_row", pa.int64()), ("path", pa.string()),
    ("key", pa.string()), ("status", pa.string()), ("detail", pa.string()),
    ("sha256", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    # What `data-prep stats` reads about each written sample, so the report never opens a tar. Stats
    # files written before these columns lack them; readers treat them as optional.
    ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string()), ("label", pa.int32()),
    # Set by `data-prep filter` (data_prep/filter.py) for every row it scored, kept or not; null elsewhere.
    ("clip_score", pa.float32()),
    # Its 64-bit pHash (data_prep/near_dup.py), likewise from `data-prep filter`; null for an image without one.
    ("phash", pa.uint64()),
])


class HashClaimer(Protocol):
    def claim(self, digests: list[str]) -> list[bool]: ...


@dataclass(frozen=True)
class PartitionTask:
    shard_index: int
    source: str
    base_dir: str
    first_source_row: int
    """Row number, within its source table, of this partition's first row."""
    first_global_row: int
    """Row number across all inputs of the job (the `row` column of the stats)."""
    rows: pa.Table
    key_digits: int
    """Width of the row offset in default keys (shard index then offset, like img2dataset)."""
    eval_layout: bool = False
    """CLIP_benchmark eval-set layout: shards named `0.tar`, `1.tar`, ... (not `00000.tar`), and a
    partition whose rows were all rejected still writes an (empty) tar, so the shards always run
    0..N-1 without a gap, as CLIP_benchmark's `{0..N-1}.tar` from nshards.txt expects."""

    @property
    def shard_file(self) -> str:
        return shard_name(self.shard_index, padded=not self.eval_layout)


@dataclass
class PartitionResult:
    shard: ShardRecord
    num_rows: int
    status_counts: dict[str, int] = field(default_factory=dict)


def stats_path(out_dir: Path, task: PartitionTask) -> Path:
    """`00000.stats.parquet` next to `00000.tar` (`0.stats.parquet` in the eval-set layout)."""
    return Path(out_dir) / (task.shard_file[: -len(".tar")] + STATS_SUFFIX)


def read_stats(path: Path) -> tuple[ShardRecord, pa.Table]:
    table = pq.read_table(path)
    record = json.loads(table.schema.metadata[_SHARD_META_KEY])
    return ShardRecord(**record), table


def process_partition(spec: RowSpec, task: PartitionTask, out_dir: str, num_threads: int,
                      claimer: HashClaimer | None = None, retry_failed: bool = False) -> PartitionResult:
    """Build, write and account for every row of `task`; never raises for a bad row."""
    out = Path(out_dir)
    rows = task.rows.to_pylist()
    keys = [_key(spec, task, offset, row) for offset, row in enumerate(rows)]
    previous = _previous_outcome(out, task) if retry_failed else None
    todo = [i for i in range(len(rows)) if previous is None or previous[0][i]["status"] != OK]
    outcomes: dict[int, BuiltRow | RowRejected] = dict(zip(todo, _build_all(
        spec, task, [rows[i] for i in todo], [keys[i] for i in todo], todo, num_threads)))
    if claimer is not None:
        _drop_duplicates(outcomes, claimer)
    statuses = previous[0] if previous else [{} for _ in rows]
    samples = dict(previous[1]) if previous else {}
    for offset, outcome in outcomes.items():
        statuses[offset] = _status(spec, task, offset, rows[offset], keys[offset], outcome)
        if isinstance(outcome, BuiltRow):
            samples[keys[offset]] = outcome.sample
    ordered = [samples[keys[i]] for i in range(len(rows)) if statuses[i]["status"] == OK]
    record = _write_tar(out, task, ordered)
    _write_stats(stats_path(out, task), statuses, record)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status["status"]] = counts.get(status["status"], 0) + 1
    return PartitionResult(record, len(rows), counts)


def _key(spec: RowSpec, task: PartitionTask, offset: int, row: dict) -> str:
    if spec.key_col is None:
        return f"{task.shard_index:05d}{offset:0{task.key_digits}d}"
    value = row.get(spec.key_col)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")  # U+FFFD makes it invalid_key
    return "" if value is None else str(value).strip()


def _build_all(spec: RowSpec, task: PartitionTask, rows: Sequence[dict], keys: Sequence[str],
               offsets: Sequence[int], num_threads: int) -> list[BuiltRow | RowRejected]:
    def build(args: tuple[dict, str, int]) -> BuiltRow | RowRejected:
        row, key, offset = args
        try:
            if not key or any(c in key for c in "./\\\ufffd") or not key.isprintable():
                raise RowRejected("invalid_key", key[:100])
            ctx = RowContext(task.source, task.base_dir, _source_row(task, offset, row), key)
            return build_sample(spec, row, ctx)
        except RowRejected as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - an unforeseen bad row must not end the job
            return RowRejected("error", f"{type(exc).__name__}: {exc}")

    # Threads overlap downloads and file reads; Pillow releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return list(pool.map(build, zip(rows, keys, offsets)))


def _source_row(task: PartitionTask, offset: int, row: dict) -> int:
    original = row.get(SOURCE_ROW_COL)
    return task.first_source_row + offset if original is None else int(original)


def _drop_duplicates(outcomes: dict[int, BuiltRow | RowRejected], claimer: HashClaimer) -> None:
    built = [(offset, o) for offset, o in sorted(outcomes.items()) if isinstance(o, BuiltRow)]
    claims = claimer.claim([o.sha256 for _, o in built]) if built else []
    for (offset, outcome), first in zip(built, claims):
        if not first:
            outcomes[offset] = RowRejected("duplicate_image", outcome.sha256)


# What a rejection means when the code that rejected the row had nothing more specific to say.
_REASON_DETAIL = {
    "missing_caption": "no caption in {caption_col}", "empty_caption": "blank caption in {caption_col}",
    "caption_not_utf8": "caption in {caption_col} is not UTF-8", "missing_label": "no label in {label_col}",
    "missing_url": "no URL in {image_col}", "missing_path": "no path in {image_col}",
    "missing_bytes": "no bytes in {image_col}", "not_bytes": "{image_col} does not hold bytes",
    "duplicate_key": "an earlier row has this {key_col}", "invalid_key": "empty or unusable key",
}


def row_path(spec: RowSpec, row: dict) -> str | None:
    """The image's path or URL as the input gave it (a bytes column: the struct's path, if any)."""
    value = row.get(spec.image_col)
    if spec.image_source == "bytes":
        value = value.get("path") if isinstance(value, dict) else None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return None if value is None else str(value)[:1000]


def _status(spec: RowSpec, task: PartitionTask, offset: int, row: dict, key: str,
            outcome: BuiltRow | RowRejected) -> dict:
    status: dict[str, Any] = {
        "row": task.first_global_row + offset, "source": task.source,
        "source_row": _source_row(task, offset, row), "path": row_path(spec, row), "key": key,
        "status": OK, "detail": "", "sha256": None,
        "original_width": None, "original_height": None,
    }
    if isinstance(outcome, RowRejected):
        detail = outcome.detail
        if not detail:
            columns = {"caption_col": spec.caption_col, "label_col": spec.label_col,
                       "image_col": spec.image_col, "key_col": spec.key_col}
            detail = _REASON_DETAIL.get(outcome.reason, outcome.reason.replace("_", " ")).format(
                **{k: repr(v) for k, v in columns.items()})
        status.update(status=outcome.reason, detail=detail[:500])
    else:
        status.update(sha256=outcome.sha256, original_width=outcome.image.original_width,
                      original_height=outcome.image.original_height, width=outcome.image.width,
                      height=outcome.image.height, **_text_columns(outcome.sample))
    return status


def _text_columns(sample: Sample) -> dict[str, Any]:
    """The sample's caption(s) (.txt) and class index (.cls) for the stats file."""
    txt, cls = sample.files.get("txt"), sample.files.get("cls")
    return {"caption": None if txt is None else txt.decode("utf-8"),
            "label": None if cls is None else int(cls)}


def _write_tar(out: Path, task: PartitionTask, samples: list[Sample]) -> ShardRecord:
    path = out / task.shard_file
    if not samples and not task.eval_layout:
        path.unlink(missing_ok=True)  # an empty shard would only confuse loaders
        return ShardRecord(path.name, 0, 0, "")
    return write_shard(path, samples)


def write_stats(path: Path, statuses: list[dict], record: ShardRecord) -> None:
    """The stats parquet of one shard: one row per input row (columns missing from a dict are null)."""
    _write_stats(path, statuses, record)


def _write_stats(path: Path, statuses: list[dict], record: ShardRecord) -> None:
    table = pa.Table.from_pylist(statuses, schema=_STATS_SCHEMA)
    table = table.replace_schema_metadata({_SHARD_META_KEY: json.dumps(record.to_json())})
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(path)


def _previous_outcome(out: Path, task: PartitionTask) -> tuple[list[dict], dict[str, Sample]] | None:
    """Statuses and kept samples of an earlier complete run of this partition, for --retry-failed."""
    path = stats_path(out, task)
    if not path.is_file():
        return None
    record, table = read_stats(path)
    samples: dict[str, dict[str, bytes]] = {}
    if record.num_samples:
        with tarfile.open(out / record.name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return table.to_pylist(), {k: Sample(k, files) for k, files in samples.items()}
