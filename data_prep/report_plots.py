"""The PNG plots of a corpus report (data_prep/report.py). matplotlib draws on its Agg canvas through the
object API, as pipeline/reporting/plots.py does for runs: files only, and importing this module never
changes a caller's global backend. Figures are small (the report is written after every job)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from data_prep.partition import OK

# Reasons drawn with their own colour; the rest share "other".
NUM_NAMED_REASONS = 7
# Bars of the over-the-job plot: more partitions than this are drawn in consecutive groups.
MAX_PARTITION_BARS = 60
MAX_SOURCE_BARS = 15
MAX_CLASS_BARS = 100


def _figure(width_in: float = 6.0, height_in: float = 3.2, left_in: float = 0.7,
            bottom_in: float = 0.55) -> Figure:
    # Fixed margins (inches): constrained layout measures every tick label and doubled the report's time.
    fig = Figure(figsize=(width_in, height_in), dpi=80)
    fig.subplots_adjust(left=left_in / width_in, right=1 - 0.2 / width_in, bottom=bottom_in / height_in,
                        top=1 - 0.35 / height_in, wspace=0.25)
    FigureCanvasAgg(fig)
    return fig


def _hist(ax, values: np.ndarray, log_x: bool) -> None:
    if log_x:  # sizes and ratios spread over orders of magnitude: log-spaced bins
        values = values[values > 0]
    bins: int | np.ndarray = 40
    if log_x and len(values) and values.max() > values.min():
        bins = np.geomspace(values.min(), values.max(), 40)
    ax.hist(values, bins=bins, color="tab:blue")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 200, not 2x10^2
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def histogram(path: Path, values: np.ndarray, title: str, xlabel: str, log_x: bool = False) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    _hist(ax, values, log_x)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    fig.savefig(path, format="png")


def size_panels(path: Path, shorter_px: np.ndarray, aspect: np.ndarray) -> None:
    """Original shorter side and aspect ratio (width / height) of the written samples."""
    fig = _figure(8.0, 3.2)
    for ax, values, title, xlabel in zip(fig.subplots(1, 2), (shorter_px, aspect),
                                         ("Original shorter side", "Aspect ratio"),
                                         ("pixels", "width / height")):
        _hist(ax, values, log_x=True)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    fig.savefig(path, format="png")


def class_bars(path: Path, counts: list[int], classnames: list[str]) -> None:
    fig = _figure(bottom_in=1.0 if len(counts) <= 20 else 0.55)
    ax = fig.add_subplot()
    if len(counts) <= MAX_CLASS_BARS:
        ax.bar(range(len(counts)), counts, color="tab:blue")
        if len(counts) <= 20:
            ax.set_xticks(range(len(counts)), classnames, rotation=45, ha="right", fontsize="small")
        ax.set_xlabel("class")
    else:  # too many to name: the sorted counts show the imbalance
        ax.plot(sorted(counts, reverse=True), color="tab:blue")
        ax.set_xlabel("class rank")
    ax.set_title("Samples per class")
    ax.set_ylabel("samples")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, format="png")


def named_reasons(counters: list[Counter]) -> list[str]:
    """The most frequent rejection reasons overall, at most NUM_NAMED_REASONS."""
    total: Counter = Counter()
    for counter in counters:
        total.update({k: v for k, v in counter.items() if k != OK})
    return [reason for reason, _ in total.most_common(NUM_NAMED_REASONS)]


def _reason_shares(counters: list[Counter], reasons: list[str]) -> dict[str, np.ndarray]:
    """Fraction of each bar's rows rejected for each named reason, and for all others together."""
    totals = np.array([max(1, sum(c.values())) for c in counters], np.float64)
    shares = {r: np.array([c.get(r, 0) for c in counters], np.float64) / totals for r in reasons}
    other = [sum(v for k, v in c.items() if k != OK and k not in reasons) for c in counters]
    if any(other):
        shares["other"] = np.array(other, np.float64) / totals
    return shares


def rejects_by_partition(path: Path, by_partition: list[Counter]) -> None:
    group = max(1, -(-len(by_partition) // MAX_PARTITION_BARS))
    bars = [sum(by_partition[i:i + group], Counter()) for i in range(0, len(by_partition), group)]
    fig = _figure()
    ax = fig.add_subplot()
    bottom = np.zeros(len(bars))
    for reason, share in _reason_shares(bars, named_reasons(bars)).items():
        ax.bar(range(len(bars)), share, bottom=bottom, label=reason)
        bottom += share
    ax.set_title("Rejected rows over the job")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"partition (input order){f', {group} per bar' if group > 1 else ''}")
    ax.set_ylabel("fraction of rows")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3, axis="y")
    if bottom.any():
        ax.legend(fontsize="x-small", loc="upper right")
    fig.savefig(path, format="png")


def rejects_by_origin(path: Path, by_origin: dict[str, Counter], origin_kind: str) -> None:
    top = sorted(by_origin.items(), key=lambda item: -sum(item[1].values()))[:MAX_SOURCE_BARS]
    names = [name if len(name) <= 40 else name[:37] + "..." for name, _ in top]
    counters = [counter for _, counter in top]
    fig = _figure(6.0, 1.2 + 0.25 * len(top), left_in=2.2)
    ax = fig.add_subplot()
    left = np.zeros(len(top))
    for reason, share in _reason_shares(counters, named_reasons(counters)).items():
        ax.barh(range(len(top)), share, left=left, label=reason)
        left += share
    ax.set_yticks(range(len(top)), names, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of rows rejected")
    ax.set_title(f"Rejected rows by {origin_kind}")
    ax.grid(True, alpha=0.3, axis="x")
    if left.any():
        ax.legend(fontsize="x-small", loc="lower right")
    fig.savefig(path, format="png")
