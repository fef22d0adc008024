"""The driver shared by every table/tree command: plan partitions, run them (in-process or as Ray
tasks), resume, and write the manifest from the per-partition stats."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.dedup import HashRegistry
from data_prep.manifest import build_manifest, write_dataset_metadata
from data_prep.partition import OK, PartitionResult, PartitionTask, process_partition, read_stats, stats_path
from data_prep.rows import DUPLICATE_KEY_COL, EVAL_KINDS, SOURCE_ROW_COL, RowSpec
from data_prep.writer import ShardRecord, write_bytes_atomic

if TYPE_CHECKING:
    from data_prep.bucket import BucketOutput

JOB_FILE = "_job.json"
EXECUTORS = ("auto", "local", "ray")


@dataclass
class SourceTable:
    """One input (a table, or the listing of an image tree) already loaded as Arrow."""

    source: str
    base_dir: str
    """Folder that relative image paths in this source resolve against."""
    table: pa.Table
    num_unreadable_rows: int = 0


@dataclass(frozen=True)
class JobOptions:
    shard_size: int = 1000
    """Input rows per partition; each partition becomes one shard of at most this many samples."""
    num_workers: int = 1
    """Partitions in flight at once: worker processes (local pool) or Ray tasks (see `executor`)."""
    address: str | None = None
    """Ray cluster address; None with executor "ray" starts an embedded local Ray."""
    num_threads: int = 16
    """Rows fetched and decoded concurrently inside one partition."""
    dedup: bool = False
    retry_failed: bool = False
    show_progress: bool = True
    shuffle_seed: int | None = 0
    """Rows go into a seeded random order (within each input) before they are cut into shards, so a
    tree walked class by class still gives shards that mix every class; None keeps the input order.
    Evaluation sets always keep it."""
    publish: "BucketOutput | None" = None
    """--output in a bucket: out_dir is its staging folder, each finished shard is uploaded (data_prep/bucket.py)."""
    write_report: bool = True
    """Write out_dir/stats/ (report.md, report.html, plots; data_prep/report.py) once the manifest is written."""
    executor: str = "auto"
    """Where partitions run, one of EXECUTORS: "local" (this process for one worker, else a process
    pool: data_prep/local_runner.py), "ray" (tasks on `address`, $RAY_ADDRESS or an embedded Ray), or
    "auto": Ray when a cluster is named (`address` or $RAY_ADDRESS), else local. The output is the same."""

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.num_workers < 1 or self.num_threads < 1:
            raise ValueError("--shard-size, --workers and --threads must be at least 1")
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor {self.executor!r}: expected one of {EXECUTORS}")
        if self.executor == "local" and self.address is not None:
            raise ValueError("--executor local runs on this machine; drop --address or use --executor ray")

    def uses_ray(self) -> bool:
        if self.executor != "auto":
            return self.executor == "ray"
        return self.address is not None or bool(os.environ.get("RAY_ADDRESS"))


@dataclass
class JobReport:
    manifest: dict
    num_partitions_run: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def run_job(spec: RowSpec, sources: list[SourceTable], out_dir: Path, job: JobOptions, *,
            dataset_name: str, split: str, source_info: dict, extra_rejected: dict[str, int] | None = None,
            manifest_extra: dict | None = None) -> JobReport:
    """Process every row of `sources` into shards under `out_dir` and write its manifest."""
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    job = dataclasses.replace(job, shuffle_seed=None) if spec.kind in EVAL_KINDS else job
    _check_identity(out_dir, spec, sources, job)
    if spec.key_col is not None:
        sources = _mark_duplicate_keys(sources, spec.key_col)  # in input order: the first one wins
    if job.shuffle_seed is not None:
        sources = shuffle_rows(sources, job.shuffle_seed)
    tasks = plan_partitions(sources, job.shard_size, eval_layout=spec.kind in EVAL_KINDS)
    todo = [t for t in tasks if _needs_run(out_dir, t, job.retry_failed)]
    num_rows = sum(t.rows.num_rows for t in todo)
    with _progress(num_rows, job.show_progress) as advance:
        if job.publish is not None:
            advance = _publishing(advance, job.publish, out_dir)
        _execute(spec, todo, out_dir, job, _seen_hashes(out_dir, tasks) if job.dedup else None,
                 advance, _import_report if job.write_report else lambda: None)
    manifest = _finalize(out_dir, spec, tasks, sources, job, dataset_name=dataset_name, split=split,
                         source_info=source_info, extra_rejected=extra_rejected or {},
                         manifest_extra=manifest_extra or {})
    if job.write_report:
        from data_prep.report import write_report  # matplotlib: imported only when a report is written

        write_report(out_dir)
    return JobReport(manifest, len(todo), time.monotonic() - start)


def _import_report() -> None:
    """The report's imports (matplotlib: ~1 s), done while a process pool works and this process waits,
    rather than after the job, when only it is busy."""
    from data_prep import report, report_plots  # noqa: F401 - imported for their side effect


def _publishing(advance: Callable[[PartitionResult], None], bucket: "BucketOutput",
                out_dir: Path) -> Callable[[PartitionResult], None]:
    def publish_then_advance(result: PartitionResult) -> None:
        bucket.push_shard(out_dir, result.shard.name)
        advance(result)
    return publish_then_advance


def shuffle_rows(sources: list[SourceTable], seed: int) -> list[SourceTable]:
    """Each source's rows in a seeded random order; every row keeps its original row number
    (SOURCE_ROW_COL), so the stats and the samples' json still point at the input row."""
    shuffled = []
    for index, src in enumerate(sources):
        table = src.table
        if SOURCE_ROW_COL not in table.column_names:
            table = table.append_column(SOURCE_ROW_COL, pa.array(range(table.num_rows), pa.int64()))
        order = np.random.default_rng([seed & 0xFFFFFFFF, index]).permutation(table.num_rows)
        shuffled.append(dataclasses.replace(src, table=table.take(pa.array(order, pa.int64()))))
    return shuffled


def plan_partitions(sources: Iterable[SourceTable], shard_size: int,
                    eval_layout: bool = False) -> list[PartitionTask]:
    """Consecutive row ranges of each source; shard numbers run on across sources.
    `eval_layout`: CLIP_benchmark shard names `0.tar, 1.tar, ...` (see PartitionTask)."""
    tasks: list[PartitionTask] = []
    global_row = 0
    key_digits = len(str(shard_size - 1))
    for src in sources:
        for first in range(0, src.table.num_rows, shard_size):
            rows = src.table.slice(first, shard_size)
            tasks.append(PartitionTask(len(tasks), src.source, src.base_dir, first, global_row,
                                       rows, key_digits, eval_layout))
            global_row += rows.num_rows
    return tasks


def _check_identity(out_dir: Path, spec: RowSpec, sources: list[SourceTable], job: JobOptions) -> None:
    """Resuming is only safe into a folder written by the same job (same inputs and options)."""
    spec_dict = dataclasses.asdict(spec)
    spec_dict.pop("fetch")  # timeouts and retries may change between attempts
    identity = json.loads(json.dumps({
        "spec": spec_dict, "shard_size": job.shard_size, "dedup": job.dedup, "shuffle_seed": job.shuffle_seed,
        "inputs": [{"source": s.source, "num_rows": s.table.num_rows} for s in sources],
        # Eval sets switched to unpadded shard names: never resume one written with `00000.tar`.
        **({"shard_names": "unpadded"} if spec.kind in EVAL_KINDS else {}),
    }))
    if not claim_output(out_dir, identity, _upgrade_identity):
        if any(out_dir.glob("*.tar")):
            raise ValueError(f"{out_dir} already holds shards not written by data-prep; "
                             "use an empty --output folder")
        write_identity(out_dir, identity)


def _upgrade_identity(previous: dict) -> None:
    # Jobs from before --resample existed resized with bicubic: `--resample bicubic` resumes them.
    previous.get("spec", {}).get("image", {}).setdefault("resample", "bicubic")
    previous.get("spec", {}).get("image", {}).setdefault("resize_only_if_bigger", False)
    previous.setdefault("shuffle_seed", None)  # jobs from before shuffling kept the input order


def claim_output(out_dir: Path, identity: dict, upgrade: Callable[[dict], None] = lambda previous: None) -> bool:
    """True when `out_dir` holds an earlier attempt at the job `identity` (JSON-able: inputs and options),
    so its finished partitions may be kept; False when it holds no job file (the caller checks what else is
    there, then writes `identity` with write_identity). ValueError naming the keys that differ when it
    holds another job's output: resuming is only safe into a folder written by the same job. `upgrade`
    fills in, on the stored identity, keys that older versions did not record."""
    path = Path(out_dir) / JOB_FILE
    if not path.is_file():
        return False
    identity = json.loads(json.dumps(identity))  # tuples as lists, as read back
    previous = json.loads(path.read_text(encoding="utf-8"))
    upgrade(previous)
    if previous != identity:
        changed = sorted(k for k in {*identity, *previous} if previous.get(k) != identity.get(k))
        raise ValueError(f"{out_dir} holds the output of a different job ({', '.join(changed)} "
                         "differ); use a new --output folder or delete this one")
    return True


def write_identity(out_dir: Path, identity: dict) -> None:
    write_bytes_atomic(Path(out_dir) / JOB_FILE, (json.dumps(identity, indent=1) + "\n").encode("utf-8"))


def _mark_duplicate_keys(sources: list[SourceTable], key_col: str) -> list[SourceTable]:
    """Flag every repeat of a --key-col value (across all inputs); the first occurrence wins."""
    seen: set[str] = set()
    marked = []
    for src in sources:
        flags = []
        for value in src.table.column(key_col).to_pylist():
            key = None if value is None else str(value).strip()
            flags.append(key is not None and key in seen)
            if key is not None:
                seen.add(key)
        table = src.table.append_column(DUPLICATE_KEY_COL, pa.array(flags, pa.bool_()))
        marked.append(dataclasses.replace(src, table=table))
    return marked


def _needs_run(out_dir: Path, task: PartitionTask, retry_failed: bool) -> bool:
    path = stats_path(out_dir, task)
    if not path.is_file():
        return True
    if not retry_failed:
        return False
    _, table = read_stats(path)
    return bool(pc.any(pc.not_equal(table.column("status"), OK)).as_py())


def _seen_hashes(out_dir: Path, tasks: list[PartitionTask]) -> list[str]:
    """Digests of samples already on disk (seed for --dedup). Partitions without stats run from
    scratch; those with stats keep their ok rows, even under --retry-failed."""
    seen: list[str] = []
    for task in tasks:
        path = stats_path(out_dir, task)
        if path.is_file():
            _, table = read_stats(path)
            ok = table.filter(pc.equal(table.column("status"), OK))
            seen.extend(d for d in ok.column("sha256").to_pylist() if d)
    return seen


def _execute(spec: RowSpec, todo: list[PartitionTask], out_dir: Path, job: JobOptions,
             seen: list[str] | None, advance: Callable[[PartitionResult], None],
             while_running: Callable[[], None]) -> None:
    if not todo:
        return
    if job.uses_ray():
        from data_prep.ray_runner import run_partitions_on_ray

        run_partitions_on_ray(spec, todo, str(out_dir), num_workers=job.num_workers, address=job.address,
                              num_threads=job.num_threads, retry_failed=job.retry_failed, seen=seen,
                              advance=advance)
    elif job.num_workers == 1 or len(todo) == 1:  # one partition at a time: no pool to start
        claimer = HashRegistry(seen) if seen is not None else None
        for task in todo:
            advance(process_partition(spec, task, str(out_dir), job.num_threads, claimer,
                                      job.retry_failed))
    else:
        from data_prep.local_runner import run_partitions_locally

        run_partitions_locally(spec, todo, str(out_dir), num_workers=job.num_workers,
                               num_threads=job.num_threads, retry_failed=job.retry_failed, seen=seen,
                               advance=advance, while_running=while_running)


def _finalize(out_dir: Path, spec: RowSpec, tasks: list[PartitionTask], sources: list[SourceTable],
              job: JobOptions, *, dataset_name: str, split: str, source_info: dict,
              extra_rejected: dict[str, int], manifest_extra: dict) -> dict:
    shards: list[ShardRecord] = []
    rejected: dict[str, int] = dict(extra_rejected)
    unreadable = sum(s.num_unreadable_rows for s in sources)
    if unreadable:
        rejected["unreadable_row"] = rejected.get("unreadable_row", 0) + unreadable
    for task in tasks:
        record, table = read_stats(stats_path(out_dir, task))
        if record.num_samples or task.eval_layout:  # eval shards stay 0..N-1, empty ones included
            shards.append(record)
        for status, count in zip(*_value_counts(table.column("status"))):
            if status != OK:
                rejected[status] = rejected.get(status, 0) + count
    options = {"shard_size": job.shard_size, "dedup": job.dedup, "shuffle_seed": job.shuffle_seed,
               **dataclasses.asdict(spec.image),
               "image_source": spec.image_source, "image_col": spec.image_col,
               "caption_col": spec.caption_col, "label_col": spec.label_col, "key_col": spec.key_col}
    manifest = build_manifest(spec.kind, shards, source=source_info, options=options,
                              rejected=rejected, classnames=spec.classnames or None)
    manifest["num_input_rows"] = sum(t.rows.num_rows for t in tasks) + sum(extra_rejected.values()) + unreadable
    manifest["stats_files"] = [stats_path(out_dir, t).name for t in tasks]
    manifest.update(manifest_extra)
    write_dataset_metadata(out_dir, manifest, split=split, dataset_name=dataset_name)
    return manifest


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(column)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


class _progress:
    """tqdm over input rows (samples/s and ETA in the bar); silent when disabled or missing."""

    def __init__(self, num_rows: int, enabled: bool) -> None:
        self._bar = None
        self._samples = 0
        if enabled and num_rows:
            try:
                from tqdm import tqdm
            except ImportError:  # progress is a convenience, not a dependency
                return
            self._bar = tqdm(total=num_rows, unit="row", file=sys.stderr, dynamic_ncols=True)
        self._start = time.monotonic()

    def __enter__(self) -> Callable[[PartitionResult], None]:
        return self._advance

    def _advance(self, result: PartitionResult) -> None:
        self._samples += result.shard.num_samples
        if self._bar is not None:
            self._bar.update(result.num_rows)
            rate = self._samples / max(1e-9, time.monotonic() - self._start)
            self._bar.set_postfix(samples=self._samples, samples_per_s=f"{rate:.1f}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
