"""What is in a finished dataset folder, from its record alone (manifest.json and the per-partition
`*.stats.parquet`): no tar is opened and no image decoded. Stats files are read one at a time, so a
corpus of many millions of rows needs memory for a few numbers per row, not for its captions.
`data_prep/report.py` turns a CorpusStats into report.md, report.html and PNG plots."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.manifest import checked_manifest
from data_prep.partition import OK, STATS_SUFFIX

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
# Captions whose script is classified (a cheap stand-in for their language), spread over all stats files.
SCRIPT_SAMPLE_CAPTIONS = 20_000
# Optional per-row score columns: plotted when a stats file has them (written by scoring steps).
SCORE_COLUMNS = ("clip_score",)
# Unicode blocks that name a script: (first code point, last code point, script).
_SCRIPT_RANGES = (
    (0x0041, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"), (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"), (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x077F, "Arabic"),
    (0x0900, 0x097F, "Devanagari"), (0x0E00, 0x0E7F, "Thai"), (0x1100, 0x11FF, "Hangul"),
    (0x3040, 0x30FF, "Kana"), (0x3400, 0x9FFF, "Han"), (0xAC00, 0xD7AF, "Hangul"),
)
_ASCII_LETTER = re.compile("[A-Za-z]")
_NUMERIC = ("original_width", "original_height", "width", "height", "label")


@dataclass
class CorpusStats:
    folder: Path
    manifest: dict
    num_stats_rows: int = 0
    """Rows in the stats files (the manifest's num_input_rows also counts rows rejected before partitioning)."""
    reasons_by_partition: list[Counter] = field(default_factory=list)
    """Status counts (`ok` included) per partition, in job order: input file order, then row order."""
    reasons_by_origin: dict[str, Counter] = field(default_factory=dict)
    """Status counts per origin: the URL's host for URL rows, else the input file."""
    origin_kind: str = "input file"
    values: dict[str, np.ndarray] = field(default_factory=dict)
    """Per written sample: original/stored width and height, label, caption_chars, caption_words,
    and each score column found; rows without the value are left out."""
    scripts: Counter = field(default_factory=Counter)
    num_script_captions: int = 0
    num_repeated_images: int = 0
    """Written samples whose sha256 equals an earlier written sample's (possible without --dedup)."""

    @property
    def rejected(self) -> dict[str, int]:
        return dict(self.manifest.get("rejected", {}))

    def percentiles(self, name: str) -> list[float] | None:
        """PERCENTILES of a value over written samples (observed values: numpy's 'lower' method)."""
        values = self.values.get(name)
        if values is None or not len(values):
            return None
        return [float(v) for v in np.percentile(values, PERCENTILES, method="lower")]


def stats_files(folder: Path, manifest: dict) -> list[Path]:
    """The stats files in job order (as the manifest lists them; older manifests: by name)."""
    names = manifest.get("stats_files")
    if names is None:
        return sorted(folder.glob(f"*{STATS_SUFFIX}"))
    return [folder / name for name in names]


def collect(folder: Path | str) -> CorpusStats:
    """Read `folder`'s manifest and stats files (ValueError names a missing or broken one)."""
    folder = Path(folder)
    manifest = checked_manifest(folder)
    stats = CorpusStats(folder, manifest)
    by_url = manifest.get("options", {}).get("image_source") == "url"
    stats.origin_kind = "URL host" if by_url else "input file"
    files = stats_files(folder, manifest)
    parts: dict[str, list[np.ndarray]] = {}
    digests: list[np.ndarray] = []
    script_quota = max(1, SCRIPT_SAMPLE_CAPTIONS // max(1, len(files)))
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: listed in {folder / 'manifest.json'} but missing")
        table = pq.read_table(path)
        _count_statuses(stats, table, by_url)
        ok = table.filter(pc.equal(table.column("status"), OK))
        _collect_values(ok, parts)
        digests.append(_digest_prefixes(ok))
        _collect_scripts(stats, ok, script_quota)
    stats.values = {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}
    all_digests = np.concatenate(digests) if digests else np.zeros(0, np.uint64)
    stats.num_repeated_images = int(len(all_digests) - len(np.unique(all_digests)))
    return stats


def _count_statuses(stats: CorpusStats, table: pa.Table, by_url: bool) -> None:
    statuses = table.column("status").to_pylist()
    stats.num_stats_rows += len(statuses)
    stats.reasons_by_partition.append(Counter(statuses))
    origins = ([origin_host(p) for p in table.column("path").to_pylist()] if by_url
               else [Path(s).name for s in table.column("source").to_pylist()])
    for origin, status in zip(origins, statuses):
        stats.reasons_by_origin.setdefault(origin, Counter())[status] += 1


def origin_host(url: str | None) -> str:
    """The host a URL row came from (`(none)` when the row had no URL, `(invalid)` when unparsable)."""
    if not url:
        return "(none)"
    try:
        return (urlsplit(url.strip()).hostname or "(invalid)").lower()
    except ValueError:
        return "(invalid)"


def _collect_values(ok: pa.Table, parts: dict[str, list[np.ndarray]]) -> None:
    for name in (*_NUMERIC, *SCORE_COLUMNS):
        if name in ok.column_names:
            column = ok.column(name).drop_null()
            parts.setdefault(name, []).append(column.to_numpy().astype(np.float64))
    if "caption" in ok.column_names:
        # A retrieval sample holds several captions, one per line: each is one caption here.
        captions = [c for text in ok.column("caption").drop_null().to_pylist() for c in text.split("\n")]
        parts.setdefault("caption_chars", []).append(np.array([len(c) for c in captions], np.float64))
        parts.setdefault("caption_words", []).append(np.array([len(c.split()) for c in captions], np.float64))


def _digest_prefixes(ok: pa.Table) -> np.ndarray:
    # 64 bits of each sha256 find repeats as well as the full digest would, in an eighth of the memory.
    hexes = [d for d in ok.column("sha256").to_pylist() if d]
    return np.array([int(d[:16], 16) for d in hexes], np.uint64)


def _collect_scripts(stats: CorpusStats, ok: pa.Table, quota: int) -> None:
    if "caption" not in ok.column_names:
        return
    for text in ok.column("caption").drop_null().to_pylist()[:quota]:
        stats.scripts[caption_script(text)] += 1
        stats.num_script_captions += 1


def caption_script(text: str) -> str:
    """The script most of a caption's letters are written in (`none` when it has no letters)."""
    if text.isascii():  # most captions: every ASCII letter is Latin (~1 us instead of ~30 per caption)
        return "Latin" if _ASCII_LETTER.search(text) else "none"
    counts: Counter = Counter()
    for char in text:
        if char.isalpha():
            code = ord(char)
            counts[next((name for low, high, name in _SCRIPT_RANGES if low <= code <= high), "other")] += 1
    return counts.most_common(1)[0][0] if counts else "none"
