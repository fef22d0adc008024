"""Partitions as Ray tasks: an embedded local Ray by default, or a cluster given by --address.
Imported only when needed, so the rest of data_prep works without starting Ray."""
from __future__ import annotations

import os
from typing import Callable

from data_prep.dedup import RayHashRegistry
from data_prep.partition import PartitionResult, PartitionTask, process_partition
from data_prep.rows import RowSpec


def run_partitions_on_ray(spec: RowSpec, todo: list[PartitionTask], out_dir: str, *, num_workers: int,
                          address: str | None, num_threads: int, retry_failed: bool, seen: list[str] | None,
                          advance: Callable[[PartitionResult], None]) -> None:
    """Run every partition as a task, at most 2 x num_workers in flight; results in completion order.
    The arguments are JobOptions' fields of the same names (data_prep/job.py)."""
    import ray

    # --address, else RAY_ADDRESS attaches on purpose; neither means a private local cluster.
    started_here = ensure_ray(num_workers, address or os.environ.get("RAY_ADDRESS") or None)
    try:
        # Partitions are idempotent (atomic renames), so Ray may safely retry a lost worker's task.
        remote = ray.remote(num_cpus=1, max_retries=2)(process_partition)
        claimer = RayHashRegistry.start(seen) if seen is not None else None
        spec_ref = ray.put(spec)
        queue = list(reversed(todo))
        pending: list = []
        while queue or pending:
            while queue and len(pending) < 2 * num_workers:
                task = queue.pop()
                pending.append(remote.remote(spec_ref, task, out_dir, num_threads, claimer, retry_failed))
            done, pending = ray.wait(pending, num_returns=1)
            advance(ray.get(done[0]))
    finally:
        if started_here:
            ray.shutdown()


def ensure_ray(num_workers: int, address: str | None) -> bool:
    """Connect to (or start) Ray unless this process already did; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, configure_logging=False)
    else:
        # With this set, a single-machine Ray takes 127.0.0.1 as its node address: all its traffic stays on
        # loopback (README, "Tests and environment").
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        # Ray runs workers at nice 15 by default (to keep its own daemons responsive); on a busy
        # machine that starves our workers behind everything else. Our workers are the job: nice 0,
        # like the processes of img2dataset or any other command the user runs.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": private, never the cluster a stale session pointer file names.
        ray.init(address="local", num_cpus=num_workers, include_dashboard=False, configure_logging=False)
    return True

