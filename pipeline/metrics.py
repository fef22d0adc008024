"""What a metric key means, and the run's record of them: metrics.jsonl rows, the same rows to the run's
experiment trackers (TensorBoard by default; pipeline/reporting/trackers.py) and a console progress line
(rank 0 only).

Keys say where a number comes from (README "Metrics"):
  train/...           the log window's training numbers: loss, lr, samples_per_second, data_wait_seconds,
                      data_wait_fraction, skipped_samples (reason -> count); matryoshka/<width>/loss (CLIP with
                      contrastive.matryoshka_dims: each width's own loss)
  val/...             validation during training: top1, top5, loss, samples, expected_samples, warnings; CLIP's
                      image/text_retrieval_recall@k and zeroshot/<set>/acc1 ...; the EMA weights' under val/ema/
  eval/<dataset>/...  `launch eval` results where the report draws them (the result JSONs keep CLIP_benchmark's
                      keys: acc1, acc5 ...); eval.async's rows in metrics.jsonl, at the checkpoint's step
                      (pipeline/evaluation/follow.py)
  step, epoch, time_utc, checkpoint, preempted: bookkeeping, bare.
Accuracies and recalls are fractions in [0, 1] in every file; `as_text` shows them in percent, for people.
Rows written before the keys had prefixes are translated on read (`from_legacy`).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Protocol

TRAIN, VAL, VAL_EMA = "train", "val", "val/ema"
BOOKKEEPING = frozenset({"step", "epoch", "time_utc", "checkpoint", "preempted"})
_ACCURACY = re.compile(r"(^|/)(top\d+|acc\d+|mean_per_class_recall|(image|text)_retrieval_recall@\d+)$")


def prefixed(prefix: str, metrics: dict) -> dict:
    """{'top1': x} -> {'val/top1': x}."""
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def zeroshot_prefix(name: str) -> str:
    """Where the metrics of the zero-shot set `name` go inside val/ (val/zeroshot/<name>/acc1 ...)."""
    return f"zeroshot/{name}"


def eval_key(dataset: str, metric: str) -> str:
    return f"eval/{dataset}/{metric}"


def is_accuracy(key: str) -> bool:
    """Top-k accuracy, mean per-class recall or retrieval recall: a fraction of samples."""
    return _ACCURACY.search(key) is not None


def percent(fraction: float) -> str:
    """A fraction as people read it: 0.7531 -> '75.31%'."""
    return f"{100 * fraction:.2f}%"


def as_text(key: str, value) -> str:
    """One metric for people: accuracies and recalls in percent, other floats at 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if is_accuracy(key):
        return percent(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- rows of older runs

_LEGACY_TRAIN = frozenset({"loss", "lr", "samples_per_second", "data_wait_seconds", "data_wait_fraction",
                           "skipped_samples"})
_LEGACY_PERCENT = re.compile(r"^top\d+$")  # classify wrote val_top1/top5 (and EMA's) in percent
_LEGACY_ZEROSHOT = re.compile(
    r"^zeroshot_(?P<name>.+?)_(?P<metric>acc\d+|mean_per_class_recall|skipped_samples|samples|num_\w+)$")


def _legacy_val_key(key: str) -> str:
    zero_shot = _LEGACY_ZEROSHOT.match(key)
    return f"{zeroshot_prefix(zero_shot['name'])}/{zero_shot['metric']}" if zero_shot else key


def from_legacy(row: dict) -> dict:
    """A metrics row under this version's keys. Rows written before keys had prefixes (`loss`, `val_top1` in
    percent, `val_ema_top1`, `val_zeroshot_<set>_acc1`) are translated, percent top-k becoming a fraction;
    current keys, bookkeeping and keys this table does not know pass unchanged."""
    out: dict = {}
    for key, value in row.items():
        if "/" in key or key in BOOKKEEPING:
            out[key] = value
        elif key in _LEGACY_TRAIN:
            out[f"{TRAIN}/{key}"] = value
        elif key.startswith(("val_ema_", "val_")):
            prefix, rest = (VAL_EMA, key[len("val_ema_"):]) if key.startswith("val_ema_") else (VAL, key[4:])
            if _LEGACY_PERCENT.match(rest) and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = value / 100
            out[f"{prefix}/{_legacy_val_key(rest)}"] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- the record of a run

CONSOLE_KEYS = ("epoch", "train/loss", "train/lr", "train/samples_per_second", "train/data_wait_fraction",
                "val/top1", "val/top5", "val/ema/top1")
_CONSOLE_ZEROSHOT = re.compile(r"^(val/zeroshot|eval)/[^/]+/acc1$")


class RowSink(Protocol):
    """Where rows go besides metrics.jsonl: the experiment trackers (pipeline/reporting/trackers.py Trackers)."""

    def log(self, step: int, metrics: dict) -> None: ...


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, trackers: RowSink | None = None):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_seconds = time.time()
        self._trackers = trackers
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        """One row; `metrics` carry their full keys (train/loss, val/top1, epoch ...), the same in the trackers."""
        if not self.enabled:
            return
        row = {"step": step, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._trackers is not None:
            self._trackers.log(step, metrics)
        self._console(step, metrics)

    def _console(self, step: int, metrics: dict) -> None:
        keys = [*CONSOLE_KEYS, *(k for k in metrics if _CONSOLE_ZEROSHOT.match(k))]
        parts = [f"step {step}/{self.total_steps}"] + [f"{key} {as_text(key, metrics[key])}" for key in keys
                                                       if key in metrics]
        elapsed = time.time() - self.start_seconds
        print(f"[pretrain {elapsed:7.1f}s] " + " | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
