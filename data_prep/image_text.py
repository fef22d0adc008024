"""`data-prep image-text` (caption tables) and the retrieval half of `data-prep eval-set`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from data_prep.fetch import FetchOptions
from data_prep.images import ImageOptions
from data_prep.job import JobOptions, JobReport, SourceTable, run_job
from data_prep.rows import RowSpec, caption_text
from data_prep.tables import expand_inputs, read_table, require_columns
from data_prep.writer import write_bytes_atomic


@dataclass(frozen=True)
class ImageTextRequest:
    """One image-text (or retrieval) job as given on the command line."""

    inputs: tuple[str, ...]
    output: Path
    caption_col: str
    image_col: str
    image_source: str
    """url, path (relative to the table's folder) or bytes."""
    key_col: str | None = None
    image: ImageOptions = field(default_factory=ImageOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    job: JobOptions = field(default_factory=JobOptions)


def load_sources(patterns: Sequence[str], columns: Sequence[str | None]) -> list[SourceTable]:
    """Read every input table, checking the named columns before any work starts."""
    sources = []
    for path in expand_inputs(patterns):
        loaded = read_table(path)
        require_columns(loaded, columns)
        sources.append(SourceTable(str(path), str(path.parent.resolve()), loaded.table,
                                   loaded.num_unreadable_rows))
    if not any(s.table.num_rows for s in sources):
        unreadable = sum(s.num_unreadable_rows for s in sources)
        why = f"{unreadable} unreadable lines" if unreadable else "a header or schema only"
        raise ValueError(f"{', '.join(s.source for s in sources)}: no rows ({why}); nothing to write")
    return sources


def check_bytes_column(sources: Sequence[SourceTable], column: str) -> None:
    """--bytes-col must name encoded image bytes (binary, or Hugging Face's {bytes, path} struct):
    a column of text would reject every row, so it stops the job before any work."""
    for src in sources:
        kind = src.table.schema.field(column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or pa.types.is_fixed_size_binary(kind) or pa.types.is_struct(kind)
                or pa.types.is_null(kind)):
            raise ValueError(f"{src.source}: --bytes-col {column!r} is a {kind} column; it must "
                             "hold encoded image bytes (binary), e.g. parquet written from file "
                             "contents (use --path-col for file paths, --url-col for URLs)")


def _passthrough(sources: list[SourceTable], request: ImageTextRequest) -> tuple[str, ...]:
    skip = {request.caption_col} | ({request.image_col} if request.image_source == "bytes" else set())
    names = dict.fromkeys(n for s in sources for n in s.table.column_names if n not in skip)
    return tuple(names)


def run_image_text(request: ImageTextRequest) -> JobReport:
    sources = load_sources(request.inputs, [request.caption_col, request.image_col, request.key_col])
    if request.image_source == "bytes":
        check_bytes_column(sources, request.image_col)
    spec = RowSpec("image_text", request.image_col, request.image_source,
                   caption_col=request.caption_col, key_col=request.key_col,
                   passthrough_cols=_passthrough(sources, request), image=request.image,
                   fetch=request.fetch)
    source_info = {"inputs": [s.source for s in sources], "image_source": request.image_source}
    return run_job(spec, sources, request.output, request.job, dataset_name=request.output.name,
                   split="train", source_info=source_info)


def run_retrieval_set(request: ImageTextRequest, image_id_col: str | None = None) -> JobReport:
    """A retrieval set: one sample per image whose .txt holds all its captions, one per line
    (CLIP_benchmark's layout). Rows that share an image (or --image-id-col) are merged first."""
    group_col = image_id_col or request.image_col
    sources = load_sources(request.inputs, [request.caption_col, request.image_col, group_col])
    if request.image_source == "bytes":
        check_bytes_column(sources, request.image_col)
    grouped: list[SourceTable] = []
    extra_rejected: dict[str, int] = {}
    for src in sources:
        table, dropped = _group_captions(src.table, group_col, request)
        for reason, count in dropped.items():
            extra_rejected[reason] = extra_rejected.get(reason, 0) + count
        grouped.append(SourceTable(src.source, src.base_dir, table, src.num_unreadable_rows))
    spec = RowSpec("retrieval", request.image_col, request.image_source, caption_col="captions",
                   image=request.image, fetch=request.fetch)
    num_captions = sum(len(c) for g in grouped for c in g.table.column("captions").to_pylist())
    # Counted per caption row: rows = captions kept (in written or rejected images) + rejected.
    num_rows = sum(s.table.num_rows + s.num_unreadable_rows for s in sources)
    report = run_job(spec, grouped, request.output / "test", request.job,
                     dataset_name=request.output.name, split="test",
                     source_info={"inputs": [s.source for s in sources]},
                     extra_rejected=extra_rejected,
                     manifest_extra={"num_captions": num_captions, "num_input_rows": num_rows})
    write_bytes_atomic(request.output / "dataset_type.txt", b"retrieval\n")
    write_bytes_atomic(request.output / "test" / "nshards.txt",
                       f"{len(report.manifest['shards'])}\n".encode())
    return report


def _group_captions(table: pa.Table, group_col: str,
                    request: ImageTextRequest) -> tuple[pa.Table, dict[str, int]]:
    """Rows -> one row per image with a `captions` list; bad captions are counted, not kept."""
    if pa.types.is_list(table.schema.field(request.caption_col).type) and group_col == request.image_col:
        return table.rename_columns([("captions" if n == request.caption_col else n)
                                     for n in table.column_names]), {}
    order: dict[object, int] = {}
    rows: list[dict] = []
    dropped: dict[str, int] = {}
    for row in table.select(list(dict.fromkeys([group_col, request.image_col,
                                                request.caption_col]))).to_pylist():
        group = row[group_col]
        if group is None:
            dropped["missing_image_id"] = dropped.get("missing_image_id", 0) + 1
            continue
        try:
            caption = caption_text(row[request.caption_col]).replace("\n", " ")
        except Exception as exc:  # RowRejected: counted under its reason
            reason = getattr(exc, "reason", "error")
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        if group not in order:
            order[group] = len(rows)
            rows.append({request.image_col: row[request.image_col], "captions": []})
        rows[order[group]]["captions"].append(caption)
    schema = pa.schema([table.schema.field(request.image_col), ("captions", pa.list_(pa.string()))])
    return pa.Table.from_pylist(rows, schema=schema), dropped
