"""Many checkpoints x datasets x tasks from one YAML file (`launch eval --config FILE`).

    output_dir: results/smoke          # one JSON per (checkpoint, dataset, task) lands here
    batch_size: 64                     # optional, as the CLI flags
    workers: 2
    device: null
    probe_method: clip_benchmark       # optional: the linear-probe method (default logistic_regression)
    embed_dims: [null, 32, 16]         # optional: zeroshot/retrieval at each Matryoshka width (null: full)
    checkpoints:
      - runs/smoke_clip                          # a REF ...
      - {ref: weights/tiny.pt, model: ViT-B-32}  # ... or a REF with its architecture
    datasets:
      - {path: data/wds_cifar10, tasks: [zeroshot, linear-probe]}
      - {path: data/wds_flickr8k, tasks: [retrieval]}

Each checkpoint is resolved once. With `embed_dims`, zeroshot and retrieval run once per width (as
`--embed-dim D`; the result file names the width); the other tasks run once. A task that does not fit a checkpoint's kind (zero-shot on a
classifier, classify on a CLIP model) is listed as skipped in the summary rather than failing the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import yaml

from pipeline.evaluation.linear_probe import PROBE_METHODS
from pipeline.evaluation.resolver import ResolvedModel, resolve
from pipeline.evaluation.tasks import (EMBED_DIM_TASKS, EVAL_TASKS, EvalOptions, can_run, evaluate, needed_kinds,
                                      write_result)

_TOP_KEYS = {"output_dir", "checkpoints", "datasets", "batch_size", "workers", "device", "amp", "split",
             "probe_method", "embed_dims"}


@dataclass(frozen=True)
class CheckpointEntry:
    ref: str
    model: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    path: str
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class EvalPlan:
    output_dir: Path
    checkpoints: tuple[CheckpointEntry, ...]
    datasets: tuple[DatasetEntry, ...]
    options: EvalOptions
    embed_dims: tuple[int | None, ...] = (None,)
    """Widths zeroshot/retrieval score (None: the model's full width)."""


def _fail(source: Path, key: str, message: str) -> ValueError:
    return ValueError(f"{source}: {key}: {message}")


def _checkpoint(raw, source: Path, index: int) -> CheckpointEntry:
    key = f"checkpoints[{index}]"
    if isinstance(raw, str):
        return CheckpointEntry(raw)
    if not isinstance(raw, dict) or "ref" not in raw or set(raw) - {"ref", "model"}:
        raise _fail(source, key, "expected a REF string or {ref: REF, model: NAME}")
    return CheckpointEntry(str(raw["ref"]), raw.get("model"))


def _dataset(raw, source: Path, index: int) -> DatasetEntry:
    key = f"datasets[{index}]"
    if not isinstance(raw, dict) or set(raw) != {"path", "tasks"} or not isinstance(raw["tasks"], list):
        raise _fail(source, key, "expected {path: DIR, tasks: [TASK, ...]}")
    unknown = [t for t in raw["tasks"] if t not in EVAL_TASKS]
    if unknown:
        raise _fail(source, f"{key}.tasks", f"unknown task {unknown[0]!r} (valid: {', '.join(EVAL_TASKS)})")
    return DatasetEntry(str(raw["path"]), tuple(raw["tasks"]))


def load_plan(path: Path) -> EvalPlan:
    """Read and check an evaluation plan; ValueError names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read evaluation plan ({err})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "<root>", "expected a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (valid: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("output_dir", "checkpoints", "datasets"):
        if not raw.get(key):
            raise _fail(path, key, "is required")
    method = raw.get("probe_method", EvalOptions.probe_method)
    if method not in PROBE_METHODS:
        raise _fail(path, "probe_method", f"unknown method {method!r} (valid: {', '.join(PROBE_METHODS)})")
    embed_dims = raw.get("embed_dims", [None])
    if (not isinstance(embed_dims, list) or not embed_dims
            or not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 1) for d in embed_dims)):
        raise _fail(path, "embed_dims", f"expected a list of widths >= 1 or null (full width), got {embed_dims!r}")
    options = EvalOptions(split=raw.get("split", "test"), batch_size=int(raw.get("batch_size", 64)),
                          num_workers=int(raw.get("workers", 2)), device=raw.get("device"),
                          amp=bool(raw.get("amp", False)), probe_method=method)
    return EvalPlan(
        output_dir=Path(raw["output_dir"]),
        checkpoints=tuple(_checkpoint(c, path, i) for i, c in enumerate(raw["checkpoints"])),
        datasets=tuple(_dataset(d, path, i) for i, d in enumerate(raw["datasets"])),
        options=options,
        embed_dims=tuple(dict.fromkeys(embed_dims)),
    )


def result_filename(result: dict, embed_dim: int | None = None) -> str:
    """Unique per (checkpoint weights, dataset, task, width scored): the weights hash tells two steps apart."""
    step = "" if result["checkpoint_step"] is None else f"step{result['checkpoint_step']}_"
    model = result["model"].replace("/", "_")
    width = "" if embed_dim is None else f"d{embed_dim}_"
    return (f"{result['dataset']}__{result['task']}__{model}_{step}{width}"
            f"{result['checkpoint_sha256'][:12]}.json")


def run_plan(plan: EvalPlan) -> Iterator[dict]:
    """Yield one summary row per (checkpoint, dataset, task), writing each result as it finishes."""
    for entry in plan.checkpoints:
        resolved: ResolvedModel = resolve(entry.ref, entry.model)
        for dataset in plan.datasets:
            for task in dataset.tasks:
                headline = EVAL_TASKS[task].headline_metric
                row = {"checkpoint": entry.ref, "step": resolved.step, "dataset": Path(dataset.path).name,
                       "task": task, "metric": headline, "value": None, "file": None, "embed_dim": None}
                if not can_run(task, resolved):
                    yield {**row, "skipped": f"skipped: needs a {needed_kinds(task)} model"}
                    continue
                for width in plan.embed_dims if task in EMBED_DIM_TASKS else (None,):
                    result = evaluate(task, resolved, Path(dataset.path), replace(plan.options, embed_dim=width))
                    out = plan.output_dir / result_filename(result, width)
                    write_result(result, out)
                    yield {**row, "value": result["metrics"].get(headline), "file": str(out), "skipped": None,
                           "embed_dim": width}


def summary_table(rows: list[dict]) -> str:
    """Markdown table of the headline metric of every row."""
    lines = ["| checkpoint | step | dataset | task | metric | value |", "|---|---|---|---|---|---|"]
    for row in rows:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else (row["skipped"] or "-")
        step = "-" if row["step"] is None else str(row["step"])
        metric = row["metric"] if row.get("embed_dim") is None else f"{row['metric']} @ {row['embed_dim']} dims"
        lines.append(f"| {row['checkpoint']} | {step} | {row['dataset']} | {row['task']} | {metric} "
                     f"| {value} |")
    return "\n".join(lines)
