"""PNG plots of a run: training curves from metrics.jsonl and every eval metric over steps.

Counts (samples, classes, templates, captions: `is_count`) are never plotted: on the axis of a 0-1 metric
they flatten it to a line at zero. The summary tables them instead.

matplotlib runs on its Agg backend (files only, no display), selected per figure through the
object API so importing this module never changes a caller's global backend.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.metrics import eval_key
from pipeline.reporting.run_record import RunRecord, is_number

Series = list[tuple[int, float]]


@dataclass(frozen=True)
class Plot:
    title: str
    filename: str
    """PNG file name inside the report folder."""
    keys: tuple[str, ...]
    """The metrics drawn, for the summary's caption."""


@dataclass(frozen=True)
class _Curve:
    filename: str
    title: str
    ylabel: str
    keys: tuple[str, ...]
    log_y: bool = False


# Training curves, in the order the summary shows them. val/loss rides on the loss plot: the two
# are read together (over- or under-fitting).
TRAINING_CURVES = (
    _Curve("loss.png", "Loss", "loss", ("train/loss", "val/loss", "val/ema/loss")),
    _Curve("lr.png", "Learning rate", "lr", ("train/lr",)),
    _Curve("samples_per_second.png", "Throughput", "samples/s (all ranks)", ("train/samples_per_second",)),
    _Curve("data_wait_fraction.png", "Data wait", "fraction of step time waiting for data",
           ("train/data_wait_fraction",)),
)

# Validation metrics (val/...) grouped onto one plot per family; the first pattern that matches
# a key names its group.
EVAL_GROUPS = (
    (re.compile(r"^val/(ema/)?top\d+$"), "val_accuracy", "Validation accuracy"),
    (re.compile(r"^val/(ema/)?zeroshot/(?P<name>[^/]+)/(acc\d+|mean_per_class_recall)$"), "val_zeroshot_{name}",
     "Zero-shot {name}"),
    (re.compile(r"^val/(ema/)?(image|text)_retrieval_recall@\d+$"), "val_retrieval", "Retrieval recall"),
)
NOT_PLOTTED = re.compile(r"^val/(ema/)?loss$")  # on the loss plot
# What our stages and CLIP_benchmark call their counts: val/samples, val/expected_samples,
# val/zeroshot/X/samples, num_samples, num_classes, num_templates, num_captions, num_train, num_test ...
COUNT_KEY = re.compile(r"(^|[_/])num_|(^|[_/])samples$|_count$")


def is_count(key: str) -> bool:
    """A count, not a metric: tabled by the summary, never drawn."""
    return COUNT_KEY.search(key) is not None


def series(rows: list[dict], key: str) -> Series:
    return [(row["step"], float(row[key])) for row in rows if is_number(row.get(key))]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_") or "metric"


def _draw(path: Path, title: str, ylabel: str, lines: dict[str, Series], log_y: bool = False) -> None:
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in lines.items():
        steps, values = zip(*points)
        # Markers when points are few (eval every N steps), a plain line for dense training logs.
        ax.plot(steps, values, label=label, marker="o" if len(points) <= 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    fig.savefig(path, format="png")


def eval_metric_groups(rows: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """group file stem -> (title, val/... keys), in first-seen order."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("val/") or not is_number(value) or NOT_PLOTTED.match(key) or is_count(key):
                continue
            stem, title = _safe_name(key), key
            for pattern, stem_format, title_format in EVAL_GROUPS:
                match = pattern.match(key)
                if match:
                    stem = _safe_name(stem_format.format(**match.groupdict()))
                    title = title_format.format(**match.groupdict())
                    break
            keys = groups.setdefault(stem, (title, []))[1]
            if key not in keys:
                keys.append(key)
    return groups


def eval_result_series(record: RunRecord) -> dict[tuple[str, str], dict[str, Series]]:
    """(task, dataset) -> eval/<dataset>/<metric> -> points over checkpoint_step, from the eval result JSONs."""
    found: dict[tuple[str, str], dict[str, Series]] = defaultdict(lambda: defaultdict(list))
    for result in record.eval_results:
        step = result.get("checkpoint_step")
        if not isinstance(step, int):
            continue  # an outside checkpoint: in the tables, not on a curve
        for metric, value in result["metrics"].items():
            if is_number(value) and not is_count(metric):
                dataset = str(result["dataset"])
                found[(str(result["task"]), dataset)][eval_key(dataset, metric)].append((step, float(value)))
    return {key: {m: sorted(points) for m, points in metrics.items()} for key, metrics in found.items()}


def write_plots(record: RunRecord, output_dir: Path) -> list[Plot]:
    """Every plot the run's data supports, written under output_dir; returns them in summary order."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []
    for curve in TRAINING_CURVES:
        lines = {key: points for key in curve.keys if (points := series(record.rows, key))}
        if lines:
            _draw(output_dir / curve.filename, curve.title, curve.ylabel, lines, curve.log_y)
            plots.append(Plot(curve.title, curve.filename, tuple(lines)))
    for stem, (title, keys) in eval_metric_groups(record.rows).items():
        lines = {key: series(record.rows, key) for key in keys}
        _draw(output_dir / f"{stem}.png", title, "value", lines)
        plots.append(Plot(title, f"{stem}.png", tuple(keys)))
    for (task, dataset), metrics in sorted(eval_result_series(record).items()):
        filename = f"eval_{_safe_name(task)}_{_safe_name(dataset)}.png"
        _draw(output_dir / filename, f"{task} on {dataset} (eval/ results)", "value", metrics)
        plots.append(Plot(f"{task} on {dataset}", filename, tuple(metrics)))
    return plots
