"""A run dir read back for the report: metrics rows, resolved config, versions, final metrics and
the eval result JSONs under RUN_DIR/eval/.

Reading is lenient where a run can legitimately leave odd files behind: a run killed mid-write
leaves a truncated last line in metrics.jsonl, and a resumed run logs the steps after its checkpoint
a second time. Unreadable lines are counted with a reason (never fatal); a step logged twice keeps
its latest row. Rows and final metrics of runs from before the keys had prefixes (`loss`, `val_top1` in
percent) are read under today's keys, as fractions (pipeline.metrics.from_legacy). The config is read as
plain YAML, not validated, so a report still works on run dirs written before a config field was added
or renamed.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.metrics import BOOKKEEPING, TRAIN, VAL, from_legacy

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
FINAL_METRICS_FILE = "final_metrics.json"
# The configs of earlier checkpoints, kept when a relaunch resumed with changed settings (launch/resume.py).
EARLIER_CONFIGS = "config.step_*.yaml"
EVAL_DIR = "eval"
# The keys every CLIP_benchmark result (and ours, pipeline.evaluation.tasks) carries.
EVAL_RESULT_KEYS = ("dataset", "model", "task", "metrics")


@dataclass
class RunRecord:
    run_dir: Path
    rows: list[dict]
    """metrics.jsonl rows, one per step (the latest row of a step logged twice; eval.async's rows, logged later,
    merged into their step's), in step order."""
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    """final_metrics.json, else the last metrics row."""
    eval_results: list[dict] = field(default_factory=list)
    """CLIP_benchmark-style result dicts, each with '_file' (path relative to the run dir)."""
    unreadable: Counter = field(default_factory=Counter)
    """'file: reason' -> count of lines or files the report could not use."""
    num_resumes: int = 0
    """How many times the step went backwards in metrics.jsonl (a resumed run re-logs steps)."""
    earlier_configs: list[str] = field(default_factory=list)
    """config.step_XXXXXXXX.yaml file names: the config up to that checkpoint, where a relaunch changed
    resumable settings (config.yaml holds the latest)."""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_metrics(path: Path, unreadable: Counter) -> tuple[list[dict], int]:
    by_step: dict[int, dict] = {}
    num_resumes, last_step = 0, None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable[f"{METRICS_FILE}: not JSON (truncated line?)"] += 1
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            unreadable[f"{METRICS_FILE}: row without an integer step"] += 1
            continue
        if is_checkpoint_eval_row(row):  # eval.async: logged later, at an earlier step; completes that step's row
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
            continue
        if last_step is not None and row["step"] <= last_step:
            num_resumes += 1
        last_step = row["step"]
        by_step[row["step"]] = {**_eval_part(by_step.get(row["step"], {})), **from_legacy(row)}
    return [by_step[step] for step in sorted(by_step)], num_resumes


def is_checkpoint_eval_row(row: dict) -> bool:
    """A row of eval.async's results (eval/<set>/... keys and bookkeeping only, pipeline/evaluation/follow.py)."""
    return any(key.startswith("eval/") for key in row) and all(
        key.startswith("eval/") or key in BOOKKEEPING for key in row)


def _eval_part(row: dict) -> dict:
    return {key: value for key, value in row.items() if key.startswith("eval/")}


def _read_json(path: Path, unreadable: Counter):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        unreadable[f"{path.name}: not JSON"] += 1
        return None


def _read_config(path: Path, unreadable: Counter) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        unreadable[f"{CONFIG_FILE}: not YAML"] += 1
        return {}
    return config if isinstance(config, dict) else {}


def _read_eval_results(run_dir: Path, unreadable: Counter) -> list[dict]:
    results = []
    for path in sorted((run_dir / EVAL_DIR).rglob("*.json")):
        data = _read_json(path, unreadable)
        if data is None:
            continue
        if not isinstance(data, dict) or not all(key in data for key in EVAL_RESULT_KEYS) \
                or not isinstance(data["metrics"], dict):
            unreadable[f"{EVAL_DIR}/: JSON without {'/'.join(EVAL_RESULT_KEYS)}"] += 1
            continue
        results.append({**data, "_file": str(path.relative_to(run_dir))})
    return results


def load_run(run_dir: Path) -> RunRecord:
    """Everything the report shows; ValueError when RUN_DIR is not a run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"report: {run_dir}: no such run directory")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ValueError(f"report: {run_dir} has no {METRICS_FILE} (is it a run dir of `launch pretrain`?)")
    unreadable: Counter = Counter()
    rows, num_resumes = _read_metrics(metrics_path, unreadable)
    if not rows:
        raise ValueError(f"report: {metrics_path} holds no metrics rows yet")
    final = _read_json(run_dir / FINAL_METRICS_FILE, unreadable)
    return RunRecord(
        run_dir=run_dir, rows=rows, config=_read_config(run_dir / CONFIG_FILE, unreadable),
        versions=_read_json(run_dir / VERSIONS_FILE, unreadable) or {},
        final=from_legacy(final) if isinstance(final, dict) else dict(rows[-1]),
        eval_results=_read_eval_results(run_dir, unreadable), unreadable=unreadable, num_resumes=num_resumes,
        earlier_configs=sorted(p.name for p in run_dir.glob(EARLIER_CONFIGS)))


def record_warnings(record: RunRecord) -> list[tuple[str, str]]:
    """(where, warning) for every distinct warning the run and its evaluations recorded: validation that
    scored fewer samples than its shards list (val/.../warnings of metrics rows), eval results' `warnings`."""
    found: dict[tuple[str, str], None] = {}
    for row in record.rows:
        for key, value in row.items():
            if key.startswith(f"{VAL}/") and key.endswith("/warnings") and isinstance(value, list):
                found.update({(f"step {row['step']}", str(w)): None for w in value})
    for result in record.eval_results:
        if isinstance(result.get("warnings"), list):
            found.update({(result["_file"], str(w)): None for w in result["warnings"]})
    return list(found)


def skipped_totals(rows: list[dict]) -> dict[str, int]:
    """Skipped training samples by reason over the run (each row holds its log window's counts)."""
    totals: Counter = Counter()
    for row in rows:
        skipped = row.get(f"{TRAIN}/skipped_samples")
        if isinstance(skipped, dict):
            totals.update({str(k): int(v) for k, v in skipped.items() if is_number(v)})
    return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))


def _section(config: dict, name: str) -> dict:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def config_highlights(config: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the summary: what a reader checks first about a run."""
    if not config:
        return []
    run, data, model = _section(config, "run"), _section(config, "data"), _section(config, "model")
    ds, ray, optim = _section(config, "deepspeed"), _section(config, "ray"), _section(config, "optim")
    schedule = _section(config, "schedule")
    ranks, per_rank = ray.get("num_workers"), data.get("batch_size_per_rank")
    accumulation = ds.get("gradient_accumulation_steps") or 1
    global_batch = data.get("global_batch_size")
    if global_batch is None and isinstance(ranks, int) and isinstance(per_rank, int):
        global_batch = ranks * per_rank * accumulation
    pairs = [
        ("run", run.get("name")),
        ("model", f"{model.get('name')} ({model.get('kind')})" if model else None),
        ("train data", data.get("train") or data.get("sample_corpus")),
        ("val data", data.get("val")),
        ("image size (px)", data.get("image_size_px")),
        ("batch per rank", per_rank),
        ("gradient accumulation steps", accumulation if ds else None),
        ("global batch", global_batch),
        ("ranks (Ray workers)", ranks),
        ("ZeRO stage", ds.get("zero_stage")),
        ("precision", ds.get("precision")),
        ("optimizer", f"{optim.get('name')}, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}"
         if optim else None),
        ("schedule", f"{schedule.get('kind')}, {schedule.get('epochs')} epochs"
         + (f", max {schedule['max_steps']} steps" if schedule.get("max_steps") else "") if schedule else None),
        ("seed", run.get("seed")),
    ]
    return [(label, str(value)) for label, value in pairs if value is not None]
