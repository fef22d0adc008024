"""Reading input tables (parquet, CSV, TSV, JSONL, optionally gzipped) into Arrow.

A table that cannot be opened at all, or lacks a named column, is a user mistake (ValueError);
a single malformed line inside a readable table is a bad row, counted as `unreadable_row`."""
from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson")


@dataclass
class LoadedTable:
    path: Path
    table: pa.Table
    num_unreadable_rows: int
    """Lines the parser could not turn into a row (wrong field count, invalid JSON)."""


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Globs and plain paths to a sorted, de-duplicated list of existing files."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"--input {pattern}: no file matches")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise ValueError(f"--input {match}: no such file")
            if path not in paths:
                paths.append(path)
    return paths


def table_format(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return {"ndjson": "jsonl"}.get(suffix[1:], suffix[1:])
    raise ValueError(f"{path}: unknown table type (expected one of {', '.join(TABLE_SUFFIXES)}, "
                     "optionally .gz)")


def read_table(path: Path) -> LoadedTable:
    """Read a whole table; string columns may hold invalid UTF-8 (checked per row later)."""
    kind = table_format(path)
    try:
        if kind == "parquet":
            return LoadedTable(path, pq.read_table(path), 0)
        if kind == "jsonl":
            return _read_jsonl(path)
        return _read_delimited(path, "\t" if kind == "tsv" else ",")
    except (OSError, pa.ArrowException, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable {kind} table ({exc})") from None


def _read_delimited(path: Path, delimiter: str) -> LoadedTable:
    bad_lines = 0

    def skip_bad_line(_row: object) -> str:
        nonlocal bad_lines
        bad_lines += 1
        return "skip"

    parse = pa_csv.ParseOptions(delimiter=delimiter, invalid_row_handler=skip_bad_line,
                                newlines_in_values=True)
    # check_utf8=False: one caption with bad bytes must cost one row, not the whole table.
    convert = pa_csv.ConvertOptions(check_utf8=False, strings_can_be_null=True)
    table = pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    return LoadedTable(path, _binary_where_not_utf8(table), bad_lines)


def _binary_where_not_utf8(table: pa.Table) -> pa.Table:
    """String columns holding invalid UTF-8 become binary, so converting a row to Python never
    fails; the row code then rejects (caption) or replaces (pass-through) the bad bytes."""
    for index, column_field in enumerate(table.schema):
        if not pa.types.is_string(column_field.type):
            continue
        try:
            table.column(index).validate(full=True)
        except pa.ArrowInvalid:
            binary = table.column(index).cast(pa.binary())
            table = table.set_column(index, column_field.name, binary)
    return table


def _read_jsonl(path: Path) -> LoadedTable:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows: list[dict] = []
    bad_lines = 0
    with opener(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad_lines += 1
                continue
            if isinstance(value, dict):
                rows.append(value)
            else:
                bad_lines += 1
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = {c: [row.get(c) for row in rows] for c in columns}
    try:
        table = pa.table(data)
    except pa.ArrowException:
        # Mixed types in a column: keep every value, as JSON text, rather than dropping rows.
        table = pa.table({c: [None if v is None else v if isinstance(v, str) else json.dumps(v)
                              for v in values] for c, values in data.items()})
    return LoadedTable(path, table, bad_lines)


def require_columns(loaded: LoadedTable, columns: Sequence[str | None]) -> None:
    """Stop at once, naming the table and its real columns, when a flag names a missing column."""
    names = loaded.table.column_names
    for column in columns:
        if column is not None and column not in names:
            raise ValueError(f"{loaded.path}: no column {column!r} (columns: {', '.join(names)})")
