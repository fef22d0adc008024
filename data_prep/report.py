"""`data-prep stats DIR` and the report written at the end of every job: DIR/stats/report.md,
report.html (the same page) and PNG plots, from the folder's record (data_prep/corpus_stats.py).

The page is built once as a list of blocks (heading, paragraph, table, image) and rendered twice,
so the Markdown and the HTML never disagree. Fractions are fractions (0.25, not 25 %)."""
from __future__ import annotations

import html
import os
import posixpath
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from data_prep.corpus_stats import PERCENTILES, CorpusStats, collect, stats_files
from data_prep.manifest import MANIFEST_NAME, checked_manifest
from data_prep.partition import OK
from data_prep.writer import write_bytes_atomic
from pipeline import storage

REPORT_DIR = "stats"
MAX_TABLE_ROWS = 20
DUPLICATE_REASONS = ("duplicate_image", "duplicate_key")

Heading = tuple[str, str]            # ("h2", text)
Paragraph = tuple[str, str]          # ("p", text)
Table = tuple[str, Sequence[str], Sequence[Sequence[str]]]  # ("table", headers, rows)
Image = tuple[str, str, str]         # ("img", file name, caption)
Block = Union[Heading, Paragraph, Table, Image]


def write_report(folder: Path | str) -> Path:
    """Write `folder`/stats/ (report.md, report.html, PNGs); returns the report.md path."""
    stats = collect(folder)
    out = Path(folder) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(stats, out)
    write_bytes_atomic(out / "report.md", to_markdown(blocks).encode("utf-8"))
    write_bytes_atomic(out / "report.html", to_html(blocks, _title(stats)).encode("utf-8"))
    return out / "report.md"


def write_bucket_reports(url: str) -> list[str]:
    """`data-prep stats s3://...`: for the dataset folder at `url` (or each one below it), fetch its
    manifest and stats files (never a tar) into a temporary folder, write the report there and upload
    it to FOLDER/stats/. Returns the report.md URLs."""
    fs, inner = storage.filesystem(url)
    prefix = storage.scheme(url) + "://"
    inner = inner.rstrip("/")
    if fs.isfile(posixpath.join(inner, MANIFEST_NAME)):
        folders = [inner]
    else:
        folders = sorted(posixpath.dirname(p) for p in fs.find(inner) if posixpath.basename(p) == MANIFEST_NAME)
    if not folders:
        raise ValueError(f"{url}: no {MANIFEST_NAME} here or below (not a data-prep output?)")
    written = []
    for folder in folders:
        with tempfile.TemporaryDirectory(prefix="data-prep-stats-") as tmp:
            fs.get_file(posixpath.join(folder, MANIFEST_NAME), str(Path(tmp) / MANIFEST_NAME))
            for path in stats_files(Path(tmp), checked_manifest(Path(tmp))):
                fs.get_file(posixpath.join(folder, path.name), str(path))
            write_report(tmp)
            storage.upload(Path(tmp) / REPORT_DIR, prefix + posixpath.join(folder, REPORT_DIR))
        written.append(prefix + posixpath.join(folder, REPORT_DIR, "report.md"))
    return written


def _title(stats: CorpusStats) -> str:
    return f"Corpus report: {stats.folder.resolve().name}"


def _int(value: float) -> str:
    return str(int(value))


def _fraction(part: float, whole: float) -> str:
    return f"{part / whole:.4f}" if whole else "-"


def _percentile_table(stats: CorpusStats, rows: Sequence[tuple[str, str, Callable[[float], str]]]) -> Table | None:
    body = []
    for label, name, fmt in rows:
        values = stats.percentiles(name)
        if values is not None:
            body.append([label, *map(fmt, values), _int(len(stats.values[name]))])
    headers = ["", *(("min" if q == 0 else "max" if q == 100 else f"p{q}") for q in PERCENTILES), "samples"]
    return ("table", headers, body) if body else None


def report_blocks(stats: CorpusStats, out: Path) -> list[Block]:
    """Every section the record supports; plots are written into `out` as they are named."""
    from data_prep import report_plots  # matplotlib: imported only when a report is written

    _add_derived_values(stats)
    blocks: list[Block] = [("h1", _title(stats))]
    plots = _PlotCalls(report_plots)
    for section in (_rows_section, _size_section, _caption_section, _class_section, _duplicate_section,
                    _partition_section, _origin_section, _score_section):
        blocks.extend(section(stats, out, plots))
    plots.draw()
    return blocks


class _PlotCalls:
    """Stands in for data_prep/report_plots while the sections are built: records each plot call, then
    `draw` makes them all, on two cores where it can.

    Why: the report is written after the job, when only this process is busy; its 4-5 plots take
    ~0.3 s (2,000 rows), half of it drawn in a forked child meanwhile (RESULTS.md, issue 16). The
    plots are the same files either way; a child that fails leaves its plots to this process."""

    # Relative drawing times (CPU ms at 2,000 and 6,000 rows: size_panels 165-170, histogram ~85,
    # rejects_by_partition ~45, rejects_by_origin ~37): the size figure alone against the rest.
    _COST = {"size_panels": 4, "histogram": 2}

    def __init__(self, module: object) -> None:
        self._module = module
        self._calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        getattr(self._module, name)  # an unknown plot fails here, where it is named
        return lambda *args, **kwargs: self._calls.append((name, args, kwargs))

    def draw(self) -> None:
        mine, theirs = self._split()
        child = _fork_drawing(self._module, theirs) if theirs else None
        try:
            _draw(self._module, mine)
        finally:
            child_ok = child is not None and os.waitpid(child, 0)[1] == 0
        if not child_ok:
            _draw(self._module, theirs)  # no child, or it failed: draw its share here

    def _split(self) -> tuple[list, list]:
        """Two shares of about equal cost (all in one share where a fork is not safe)."""
        if len(self._calls) < 2 or not _can_fork():
            return self._calls, []
        shares: tuple[list, list] = ([], [])
        costs = [0, 0]
        for call in sorted(self._calls, key=lambda c: -self._COST.get(c[0], 1)):
            cheaper = 0 if costs[0] <= costs[1] else 1
            shares[cheaper].append(call)
            costs[cheaper] += self._COST.get(call[0], 1)
        return shares


def _draw(module: object, calls: list[tuple[str, tuple, dict]]) -> None:
    for name, args, kwargs in calls:
        getattr(module, name)(*args, **kwargs)


def _can_fork() -> bool:
    """Where the local process pool forks too: Linux, not connected to Ray (data_prep/local_runner.py)."""
    from data_prep.local_runner import start_method

    return start_method() == "fork"


def _fork_drawing(module: object, calls: list[tuple[str, tuple, dict]]) -> int | None:
    """A forked child that draws `calls` and exits 0 (1 on any error); None when fork fails."""
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    status = 1
    try:
        _draw(module, calls)
        status = 0
    finally:
        os._exit(status)  # never the parent's exit handlers, buffers or teardown


def _add_derived_values(stats: CorpusStats) -> None:
    width, height = stats.values.get("original_width"), stats.values.get("original_height")
    if width is not None and height is not None and len(width) == len(height):
        stats.values["original_shorter_side"] = np.minimum(width, height)
        stats.values["aspect_ratio"] = width / np.maximum(height, 1)


def _rows_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    m = stats.manifest
    total, rejected = m.get("num_input_rows", 0), sum(stats.rejected.values())
    blocks: list[Block] = [
        ("p", f"kind `{m.get('kind')}`, written {m.get('created_utc', '?')} by data-prep "
              f"{m.get('tool_version', '?')}; {len(m.get('shards', []))} shards, {m.get('num_bytes', 0)} bytes."),
        ("h2", "Rows"),
        ("table", ["", "rows", "fraction of input rows"],
         [["input rows", _int(total), _fraction(total, total)],
          ["samples written", _int(m.get("num_samples", 0)), _fraction(m.get("num_samples", 0), total)],
          ["rejected", _int(rejected), _fraction(rejected, total)]]),
    ]
    if stats.rejected:
        blocks += [("h2", "Rejected rows by reason"),
                   ("table", ["reason", "rows", "fraction of input rows"],
                    [[reason, _int(count), _fraction(count, total)]
                     for reason, count in sorted(stats.rejected.items(), key=lambda kv: (-kv[1], kv[0]))])]
    before = total - stats.num_stats_rows
    if before > 0:
        blocks.append(("p", f"{before} rows were rejected before partitioning (unreadable lines, files "
                            "outside class folders, captions dropped while grouping): they are in the "
                            "reason table but not in the per-partition and per-source breakdowns."))
    return blocks


def _size_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    table = _percentile_table(stats, [
        ("original width", "original_width", _int), ("original height", "original_height", _int),
        ("original shorter side", "original_shorter_side", _int),
        ("aspect ratio (width / height)", "aspect_ratio", lambda v: f"{v:.2f}"),
        ("stored width", "width", _int), ("stored height", "height", _int)])
    if table is None:
        return []
    plots.size_panels(out / "image_sizes.png", stats.values["original_shorter_side"], stats.values["aspect_ratio"])
    return [("h2", "Image sizes (written samples, pixels)"), table,
            ("img", "image_sizes.png", "original shorter side and aspect ratio")]


def _caption_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    table = _percentile_table(stats, [("characters", "caption_chars", _int), ("words", "caption_words", _int)])
    if table is None:
        return []
    plots.histogram(out / "caption_length.png", stats.values["caption_chars"], "Caption length", "characters")
    blocks: list[Block] = [("h2", "Captions (written samples)"), table,
                           ("img", "caption_length.png", "caption length in characters")]
    if stats.num_script_captions:
        blocks += [("p", f"Script of each caption (most of its letters; a cheap stand-in for its language), "
                         f"on {stats.num_script_captions} captions spread over the shards:"),
                   ("table", ["script", "captions", "fraction"],
                    [[name, _int(n), _fraction(n, stats.num_script_captions)]
                     for name, n in stats.scripts.most_common(MAX_TABLE_ROWS)])]
    return blocks


def _class_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    labels, classnames = stats.values.get("label"), stats.manifest.get("classnames")
    if labels is None or not classnames:
        return []
    counts = np.bincount(labels.astype(np.int64), minlength=len(classnames)).tolist()
    plots.class_bars(out / "classes.png", counts, classnames)
    present = [c for c in counts if c]
    ratio = f"{max(present) / min(present):.2f}" if present else "-"
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    shown = order if len(order) <= MAX_TABLE_ROWS else order[:10] + order[-10:]
    return [("h2", "Classes (written samples)"),
            ("p", f"{len(present)} of {len(classnames)} classes have samples; largest / smallest class: {ratio}."
                  + ("" if shown is order else " The 10 largest and 10 smallest classes:")),
            ("table", ["class", "label", "samples", "fraction"],
             [[classnames[i], str(i), _int(counts[i]), _fraction(counts[i], len(labels))] for i in shown]),
            ("img", "classes.png", "samples per class")]


def _duplicate_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    rejected = stats.rejected
    with_image = stats.manifest.get("num_samples", 0) + rejected.get("duplicate_image", 0)
    repeats = rejected.get("duplicate_image", 0) + stats.num_repeated_images
    return [("h2", "Duplicates"),
            ("table", ["", "rows"],
             [["rejected as duplicate_image (--dedup)", _int(rejected.get("duplicate_image", 0))],
              ["written samples repeating an earlier sample's image (same sha256)", _int(stats.num_repeated_images)],
              ["rejected as duplicate_key (--key-col)", _int(rejected.get("duplicate_key", 0))]]),
            ("p", f"Duplicate image rate: {_fraction(repeats, with_image)} of the {with_image} rows whose image "
                  "was read repeat an earlier row's image bytes.")]


def _status_row(name: str, counter: Counter) -> list[str]:
    rows, written = sum(counter.values()), counter.get(OK, 0)
    reasons = Counter({k: v for k, v in counter.items() if k != OK})
    top = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3)) or "-"
    return [name, _int(rows), _int(written), _int(rows - written), _fraction(rows - written, rows), top]


_STATUS_HEADERS = ["rows", "written", "rejected", "fraction rejected", "top reasons"]


def _partition_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    if not stats.reasons_by_partition:
        return []
    plots.rejects_by_partition(out / "rejects_by_partition.png", stats.reasons_by_partition)
    blocks: list[Block] = [("h2", "Rejections over the job (by partition, in input order)"),
                           ("img", "rejects_by_partition.png", "fraction of each partition's rows rejected, by reason")]
    if len(stats.reasons_by_partition) <= MAX_TABLE_ROWS:
        blocks.append(("table", ["partition", *_STATUS_HEADERS],
                       [_status_row(str(i), c) for i, c in enumerate(stats.reasons_by_partition)]))
    return blocks


def _origin_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    if not stats.reasons_by_origin:
        return []
    plots.rejects_by_origin(out / "rejects_by_source.png", stats.reasons_by_origin, stats.origin_kind)
    ranked = sorted(stats.reasons_by_origin.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    note = f" ({len(ranked)} in all; the {MAX_TABLE_ROWS} with most rows)" if len(ranked) > MAX_TABLE_ROWS else ""
    return [("h2", f"Rejections by source ({stats.origin_kind}){note}"),
            ("table", [stats.origin_kind, *_STATUS_HEADERS],
             [_status_row(name, c) for name, c in ranked[:MAX_TABLE_ROWS]]),
            ("img", "rejects_by_source.png", f"fraction of rows rejected per {stats.origin_kind}")]


def _score_section(stats: CorpusStats, out: Path, plots) -> list[Block]:
    values = stats.values.get("clip_score")
    if values is None or not len(values):
        return []
    plots.histogram(out / "clip_score.png", values, "CLIP score", "image-text cosine similarity")
    return [("h2", "CLIP score (written samples)"),
            _percentile_table(stats, [("clip_score", "clip_score", lambda v: f"{v:.4f}")]),
            ("img", "clip_score.png", "CLIP score histogram")]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            lines.append("")
        else:
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def to_html(blocks: Sequence[Block], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
             "</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            parts.append(f"<p><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
