"""Evaluation that follows training: each complete checkpoint of a run, scored on the sets its config names,
exactly as `launch eval` scores them (pipeline.evaluation.tasks), once.

Two users: the trainer's asynchronous evaluation actor (eval.async, pipeline/evaluation/async_eval.py) and
`launch eval --follow RUN_DIR` from outside a run (`follow` below).

The sets: data.val (every '::' part, a folder) with the task that scores the family's own kind of held-out
data (classify for labelled data, retrieval for image-text), and every eval.zeroshot set with zeroshot.

Keys: eval/<set>/<metric> with `launch eval`'s metric names (acc1, acc5, mean_per_class_recall,
image_retrieval_recall@5, num_samples ...), the prefix pipeline/metrics.py gives `launch eval` results. Not val/:
those are the trainer's in-process validation (its own transform path, top1/top5 names, acc5 counted correct
below 5 classes), and a val/ key from both at one step would overwrite one number with another.
"""
from __future__ import annotations

import json
import posixpath
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoint, families, storage
from pipeline.config import Config, ConfigError, zeroshot_entry
from pipeline.evaluation.plan import result_filename
from pipeline.evaluation.resolver import resolve
from pipeline.evaluation.tasks import EvalOptions, evaluate, write_result
from pipeline.metrics import as_text, eval_key

FOLLOW_LOG = "eval_follow.jsonl"
"""`launch eval --follow`'s record in the run dir: one row per evaluated checkpoint (also its resume state)."""
RESULTS_DIR = "eval"
"""Where `launch eval --follow` writes each result JSON; `launch report` reads them from there."""
FINAL_METRICS = "final_metrics.json"  # written by the trainer at the run's last step

# The task that scores a family's own held-out data, by the family's data kind (pipeline/families/spec.py).
VAL_TASK_BY_DATA_KIND = {"labelled": "classify", "image_text": "retrieval"}


@dataclass(frozen=True)
class EvalSet:
    name: str
    """The <set> in eval/<set>/<metric>: the folder's name, or the NAME of an eval.zeroshot 'NAME=PATH'."""
    task: str
    """A `launch eval` task (pipeline.evaluation.tasks.EVAL_TASKS)."""
    path: str


def eval_sets(cfg: Config) -> list[EvalSet]:
    """The sets a run's checkpoints are evaluated on; ConfigError names the key that cannot be used."""
    data_kind = families.get(cfg.model.kind).data_kind
    if data_kind not in VAL_TASK_BY_DATA_KIND:
        raise ConfigError("model.kind", f"no evaluation task scores {data_kind} data "
                                        f"(known: {', '.join(VAL_TASK_BY_DATA_KIND)})")
    sets = [EvalSet(Path(part.rstrip("/")).name, VAL_TASK_BY_DATA_KIND[data_kind], part)
            for part in filter(None, (p.strip() for p in (cfg.data.val or "").split("::")))]
    sets += [EvalSet(name, "zeroshot", path) for name, path in map(zeroshot_entry, cfg.eval.zeroshot)]
    names = [entry.name for entry in sets]
    for entry in sets:
        key = "eval.zeroshot" if entry.task == "zeroshot" else "data.val"
        if any(c in entry.path for c in "*?[{") or entry.path.endswith(".tar"):
            raise ConfigError(key, f"checkpoints are evaluated on folders, as `launch eval --data DIR` reads "
                                   f"them, not {entry.path!r}")
        if names.count(entry.name) > 1:
            raise ConfigError(key, f"two evaluation sets would write eval/{entry.name}/...: give eval.zeroshot "
                                   f"sets a NAME (NAME=PATH) and data.val folders different names")
    if not sets:
        raise ConfigError("data.val", "no set to evaluate checkpoints on: the run sets neither data.val nor "
                                      "eval.zeroshot")
    return sets


def eval_options(cfg: Config, num_cpus: float, device: str | None = None) -> EvalOptions:
    """`launch eval`'s options for a run's checkpoints: its validation batch size, loader workers within the
    CPUs the evaluator holds (one decodes in the evaluating process itself), fp32 as `launch eval` by default."""
    return EvalOptions(batch_size=cfg.eval.batch_size_per_rank or cfg.data.batch_size_per_rank,
                       num_workers=max(0, int(num_cpus) - 1), device=device)


def evaluate_checkpoint(ckpt_dir: Path, sets: list[EvalSet], options: EvalOptions) -> list[dict]:
    """`launch eval TASK --checkpoint ckpt_dir --data PATH` for every set: the result records, in order."""
    from pipeline.data.local_copy import readable_folder

    resolved = resolve(str(ckpt_dir))
    results = []
    for entry in sets:
        key = "eval.zeroshot" if entry.task == "zeroshot" else "data.val"
        # Sets are read whole: a bucket's is copied once to the cache, as `launch eval --data` reads it.
        results.append(evaluate(entry.task, resolved, readable_folder(entry.path, key), options))
    return results


def metrics_row(sets: list[EvalSet], results: list[dict]) -> dict:
    """eval/<set>/<metric> -> number (and eval/<set>/warnings) of one checkpoint's results."""
    row: dict = {}
    for entry, result in zip(sets, results):
        for metric, value in result["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[eval_key(entry.name, metric)] = value
        if result["warnings"]:
            row[eval_key(entry.name, "warnings")] = list(result["warnings"])
    return row


def checkpoint_step(ckpt_dir: Path) -> int:
    return int(checkpoint.read_meta(ckpt_dir)["step"])


def summary_line(step: int, row: dict) -> str:
    """The headline numbers of one row, for people (accuracies in percent)."""
    shown = [f"{key} {as_text(key, value)}" for key, value in row.items()
             if key.endswith(("/acc1", "/image_retrieval_recall@5", "/text_retrieval_recall@5"))]
    return f"step {step}: " + (" | ".join(shown) or "no headline metric")


# ---------------------------------------------------------------- `launch eval --follow RUN_DIR`


def evaluated_steps(run_ref: str | Path) -> set[int]:
    """Steps already in the follower's record (a truncated last line, from a killed follower, is ignored)."""
    path = storage.join(run_ref, FOLLOW_LOG)
    if not storage.is_file(path):
        return set()
    steps = set()
    for line in storage.read_text(path).splitlines():
        try:
            steps.add(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


def complete_checkpoints(run_ref: str | Path) -> list[tuple[int | None, str]]:
    """(step, checkpoint) of the run's complete checkpoints, oldest first: local folders (step None: read from
    meta.json where retention may have deleted it meanwhile), or URLs for a run in a bucket with the step from
    its listing, so an evaluated checkpoint is never downloaded."""
    if not storage.is_remote(run_ref):
        return [(None, str(path)) for path in checkpoint.list_complete(Path(run_ref))]
    from pipeline.run_mirror import complete_steps, remote_steps

    return [(step, storage.join(run_ref, "checkpoints", checkpoint.step_tag(step)))
            for step in complete_steps(remote_steps(str(run_ref)))]


def _append_row(run_ref: str | Path, row: dict) -> None:
    """One line onto the follower's record. In a bucket the object is rewritten whole: the follower is its only
    writer (unlike metrics.jsonl, which the training run uploads over)."""
    path, line = storage.join(run_ref, FOLLOW_LOG), json.dumps(row) + "\n"
    if not storage.is_remote(path):
        with open(path, "a") as log:
            log.write(line)
        return
    storage.write_text(path, (storage.read_text(path) if storage.is_file(path) else "") + line)


def follow_once(run_ref: str | Path, device: str | None = None) -> list[int]:
    """Evaluate every complete checkpoint of the run (a local folder or a bucket URL) not yet in its record;
    returns the steps evaluated.

    Each result JSON goes to RUN/eval/ (as `launch eval --output` would write it), then one row to
    RUN/eval_follow.jsonl, which is what marks the checkpoint done: a follower killed mid-checkpoint
    evaluates it again. Not metrics.jsonl: the training run appends to that file while this runs (and for a run
    in a bucket, uploads its own copy over it), so rows from a second writer could be lost or cut. A checkpoint
    in a bucket is evaluated from a cached local copy (pipeline.remote_refs)."""
    done, evaluated = evaluated_steps(run_ref), []
    for listed_step, ckpt_ref in complete_checkpoints(run_ref):
        if listed_step in done:
            continue
        try:
            ckpt_dir = Path(ckpt_ref)
            if storage.is_remote(ckpt_ref):
                from pipeline.remote_refs import localize

                ckpt_dir = localize(ckpt_ref)
            step = checkpoint_step(ckpt_dir)
            if step in done:
                continue
            cfg = Config.from_dict(checkpoint.read_meta(ckpt_dir)["config"])
            sets = eval_sets(cfg)
            results = evaluate_checkpoint(ckpt_dir, sets, eval_options(cfg, num_cpus=1, device=device))
        except (ValueError, OSError) as err:
            if storage.exists(storage.join(ckpt_ref, checkpoint.META_FILE)):
                raise
            # Retention deleted it while we read it: nothing left to evaluate, nothing recorded.
            print(f"[eval] {posixpath.basename(str(ckpt_ref))}: deleted before it could be evaluated ({err})",
                  file=sys.stderr)
            continue
        for result in results:
            write_result(result, storage.join(run_ref, RESULTS_DIR, result_filename(result)))
        row = {"step": step, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "checkpoint": str(ckpt_ref), **metrics_row(sets, results)}
        _append_row(run_ref, row)
        print(f"[eval] {summary_line(step, row)}", file=sys.stderr, flush=True)
        evaluated.append(step)
    return evaluated


def follow(run_ref: str, interval_s: float, until_done: bool, device: str | None = None) -> list[int]:
    """Evaluate new complete checkpoints every interval_s; with until_done, return once the run has written
    its final metrics and a scan after that found nothing new (else run until interrupted). `run_ref`: a run
    directory, or its URL for a run in a bucket (results and record are written there)."""
    if storage.is_remote(run_ref):
        storage.check_reachable(run_ref, "--follow", writable=True)
    if not storage.is_dir(run_ref):
        raise ValueError(f"--follow {run_ref}: no such run directory")
    evaluated: list[int] = []
    while True:
        # Read before the scan: its last checkpoint is complete.
        finished = storage.is_file(storage.join(run_ref, FINAL_METRICS))
        found = follow_once(run_ref, device)
        evaluated += found
        if until_done and finished and not found:
            return evaluated
        if not found:
            time.sleep(interval_s)
