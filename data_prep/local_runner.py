"""Partitions on a local process pool: `--workers N` (N > 1) on one machine without a Ray cluster.

Why not Ray here: on a single machine Ray's start (~4 s) and shutdown (~1.5 s) cost more than the work
of a small job (benchmarks/RESULTS.md, data-prep). The contract is ray_runner's: every partition is
idempotent (tar and stats renamed into place; the stats file marks it done), results reach `advance` in
completion order in this process (so progress and bucket publishing stay here), --dedup claims go to one
registry shared by all workers (first claim wins), and a lost worker's partitions are run again.

Workers are forked on Linux (Python's default there before 3.14, and what img2dataset's multiprocessing
distributor does): a fork server would import pyarrow and Pillow afresh, ~1-2 s of a small job. Forking is
safe here because the children only run process_partition: the driver's other threads are tqdm's monitor
(which the children never touch) and Arrow's and OpenBLAS's native pools, which re-initialise after a
fork (pthread_atfork). Elsewhere (macOS, Windows) workers are spawned, those platforms' default."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Callable

from data_prep.dedup import HashRegistry
from data_prep.partition import OK, PartitionResult, PartitionTask, process_partition, read_stats, stats_path
from data_prep.rows import RowSpec

MAX_POOL_RESTARTS = 2
"""A pool that loses a worker (killed, out of memory) is replaced this often; Ray's max_retries=2."""
_PARENT_POLL_SECONDS = 1.0


class _RegistryManager(BaseManager):
    """One HashRegistry in a manager process; workers call it through a picklable proxy."""


_RegistryManager.register("HashRegistry", HashRegistry)


def run_partitions_locally(spec: RowSpec, todo: list[PartitionTask], out_dir: str, *, num_workers: int,
                           num_threads: int, retry_failed: bool, seen: list[str] | None,
                           advance: Callable[[PartitionResult], None],
                           while_running: Callable[[], None] = lambda: None) -> None:
    """Run every partition in a pool of `num_workers` processes; arguments as run_partitions_on_ray's.
    `while_running` runs in this process once the workers have started (after the fork: it may import
    and start threads), while they work."""
    context = multiprocessing.get_context(start_method())
    remaining = {task.shard_index: task for task in todo}
    for restart in range(MAX_POOL_RESTARTS + 1):
        with contextlib.ExitStack() as stack:
            claimer = None
            if seen is not None:
                # A fresh registry for each pool: what the lost pool's workers claimed but never wrote
                # must not count as seen; what finished is on disk.
                manager = _RegistryManager(ctx=context)
                manager.start(_watch_parent, (os.getpid(),))
                stack.callback(manager.shutdown)
                claimer = manager.HashRegistry(seen + _written_digests(out_dir, todo, remaining))
            try:
                _run_pool(context, spec, remaining, out_dir, num_workers, num_threads, retry_failed,
                          claimer, advance, while_running)
                return
            except BrokenProcessPool:
                if restart == MAX_POOL_RESTARTS:
                    raise
                print(f"data-prep: a worker process died; running {len(remaining)} unfinished "
                      "partitions in a new pool", file=sys.stderr, flush=True)


def start_method() -> str:
    """fork on Linux, unless this process is connected to Ray: a forked copy of a Ray driver shares its
    sockets to the raylet and its gRPC threads' state, and in the test suite (data-prep called in-process
    beside the session's Ray cluster) a forked pool took the driver down with it. Such a process pays the
    fork server's start instead; the `data-prep` command never holds a Ray connection when it uses the pool."""
    ray = sys.modules.get("ray")
    if sys.platform != "linux":
        return "spawn"
    return "forkserver" if ray is not None and ray.is_initialized() else "fork"


def _written_digests(out_dir: str, todo: list[PartitionTask],
                     remaining: dict[int, PartitionTask]) -> list[str]:
    """sha256 of the samples that the partitions of `todo` already finished in this job wrote."""
    digests: list[str] = []
    for task in todo:
        if task.shard_index not in remaining:
            _, table = read_stats(stats_path(Path(out_dir), task))
            digests.extend(d for d, s in zip(table.column("sha256").to_pylist(),
                                             table.column("status").to_pylist()) if s == OK and d)
    return digests


def _run_pool(context: multiprocessing.context.BaseContext, spec: RowSpec,
              remaining: dict[int, PartitionTask], out_dir: str, num_workers: int, num_threads: int,
              retry_failed: bool, claimer: object, advance: Callable[[PartitionResult], None],
              while_running: Callable[[], None]) -> None:
    """Run the tasks of `remaining` (by shard index), removing each once its result went to `advance`."""
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_watch_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: dict[Future, PartitionTask] = {
            pool.submit(process_partition, spec, task, out_dir, num_threads, claimer, retry_failed): task
            for task in remaining.values()}
        try:
            while_running()  # the first submit forked every worker (fork start: all at once)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                # Successes first: a broken pool fails every other future, and those finished are kept.
                for future in sorted(done, key=lambda f: f.exception() is not None):
                    task = pending.pop(future)
                    advance(future.result())  # BrokenProcessPool here: the caller starts a new pool
                    del remaining[task.shard_index]
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _watch_parent(driver_pid: int) -> None:
    """Worker initializer: exit when the driver is gone (killed with SIGKILL, say), instead of waiting
    forever for work on a queue that no one will write to again."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            threading.Event().wait(_PARENT_POLL_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name=f"watch-driver-{driver_pid}", daemon=True).start()
