"""Preemption: a SIGTERM (or the driver's request file) becomes a complete checkpoint at an agreed step.

Spot and preemptible nodes get SIGTERM some seconds before they go. Any rank may be the one told, so
after every optimizer step the ranks agree (one all-reduce of a flag) whether anyone was: then each
finishes that step, all write the checkpoint of that step together, and the run stops with
EXIT_PREEMPTED. Relaunching the same command resumes at the exact next sample.

Under Ray Train the training function runs in a thread of the worker actor, where Python cannot install
signal handlers; the driver's handler (launch pretrain) writes `<run_dir>/PREEMPT` instead and rank 0
reads it after each step. For a run in a bucket, rank 0 may run on another machine than the driver: the
request is also written to the bucket, where a thread of rank 0 looks for it every REMOTE_POLL_S seconds.
A worker process that is killed outright (SIGKILL, a lost node) is Ray's fault-tolerance path: the group
restarts from the last complete checkpoint.

Ray's node drain notice (a spot reclaim or `ray drain-node`-style request seen by Ray Train's preemption
watcher, Ray >= 2.5x's `ray.train.get_preemption_info`) is a third source: it is a collective through Ray, so
it is read in the same step by every rank, at most every DRAIN_POLL_S seconds as rank 0's clock decides
(the decision rides on the flag's all-reduce). The watcher itself polls Ray every 5 s.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later; a scheduler can tell it from a crash (1) or success (0)
REQUEST_FILE = "PREEMPT"  # written by the driver on SIGTERM, removed when a run starts
PREEMPTED_RECORD = "preempted.json"  # written by rank 0: the step and checkpoint a preemption left


REMOTE_POLL_S = 2.0
DRAIN_POLL_S = 5.0


def request_file(run_dir: Path) -> Path:
    return Path(run_dir) / REQUEST_FILE


def request_url(cfg) -> str | None:
    """The request's copy in the bucket, for a run whose directory is in one."""
    from pipeline import storage

    return storage.join(cfg.run_url, REQUEST_FILE) if storage.is_remote(cfg.run.output_dir) else None


class Preemption:
    """Whether this step is the last one because some rank (or the driver) was told to stop."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, remote_request: str | None = None):
        self.requested = False
        self.rank, self.world_size = rank, world_size
        self.request = request_file(run_dir)
        self._remote_seen = False
        self._stop_polling = threading.Event()
        if remote_request and rank == 0:
            threading.Thread(target=self._poll, args=(remote_request,), daemon=True, name="preempt-poll").start()
        import torch.distributed as dist  # here, so that the launcher imports this module without torch

        # The flag travels on a CPU group: an NCCL all-reduce of a device tensor would sync the GPU stream
        # after every step. Gloo on loopback or the cluster network costs tens of microseconds.
        self.group = None
        if world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._drain_notice = _ray_train_drain_notice()
        self._drain_polled_at = time.monotonic()

    def _poll(self, url: str) -> None:
        from pipeline.run_mirror import fresh_exists

        while not self._stop_polling.wait(REMOTE_POLL_S):
            try:
                if fresh_exists(url):
                    self._remote_seen = True
                    return
            except Exception:  # noqa: BLE001 - a flaky listing is retried at the next poll
                continue

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        if callable(self._previous):  # the driver's handler, when driver and rank share a process (--no-ray)
            self._previous(signum, frame)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (or the driver asked): call after each step."""
        import torch
        import torch.distributed as dist

        local = self.requested or (self.rank == 0 and (self._remote_seen or self.request.exists()))
        poll_drain = (self._drain_notice is not None and self.rank == 0
                      and time.monotonic() - self._drain_polled_at >= DRAIN_POLL_S)
        if self.world_size > 1 and dist.is_initialized():
            flags = torch.tensor([int(local), int(poll_drain)], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            local, poll_drain = bool(flags[0]), bool(flags[1])
        if local or not poll_drain:
            return local
        self._drain_polled_at = time.monotonic()
        notice = self._drain_notice()  # every rank calls it in this step: Ray agrees on one answer
        if notice is not None and self.rank == 0:
            print(f"[pretrain] Ray drain notice: node(s) {', '.join(notice.preempted_node_ids)} will be reclaimed"
                  + (f" in {max(0.0, notice.deadline_ms / 1000 - time.time()):.0f} s" if notice.deadline_ms else ""),
                  flush=True)
        return notice is not None

    def close(self) -> None:
        self._stop_polling.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _ray_train_drain_notice():
    """`ray.train.get_preemption_info` inside a Ray Train worker of a Ray that has it, else None."""
    try:
        import ray.train

        notice = getattr(ray.train, "get_preemption_info", None)
        if notice is None or not ray.is_initialized():
            return None
        ray.train.get_context()  # raises outside a Ray Train worker (plain process, --no-ray, benchmarks)
        return notice
    except Exception:  # noqa: BLE001 - no Ray Train here: SIGTERM and the request file remain
        return None


def clear(run_dir: Path, cfg=None) -> None:
    """A new launch starts unpreempted: drop the previous request and record (in the bucket too, given `cfg`)."""
    for name in (REQUEST_FILE, PREEMPTED_RECORD):
        (Path(run_dir) / name).unlink(missing_ok=True)
        if cfg is not None:
            from pipeline.run_mirror import remove_run_file

            remove_run_file(cfg, name)


def was_preempted(run_dir: Path, cfg=None) -> dict | None:
    """The record rank 0 left; given `cfg`, read where the run lives (the bucket for a run in one)."""
    import json

    if cfg is not None:
        from pipeline.run_mirror import read_run_json

        return read_run_json(cfg, PREEMPTED_RECORD)
    record = Path(run_dir) / PREEMPTED_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


class DriverHandler:
    """SIGTERM to the driver: ask the ranks to checkpoint (request file), and bound the wait.

    Used as a context manager around the training call; outside it SIGTERM keeps its previous meaning."""

    def __init__(self, run_dir: Path, grace_s: float, remote_request: str | None = None):
        self.run_dir, self.grace_s, self.remote_request = Path(run_dir), grace_s, remote_request
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "DriverHandler":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        if self._timer is not None:
            return  # a second notice: the first one's wait is already running
        request_file(self.run_dir).write_text("preemption requested by SIGTERM to the driver\n")
        if self.remote_request:  # rank 0 may be on another machine; not from the handler itself: network
            threading.Thread(target=_write_remote_request, args=(self.remote_request,), daemon=True).start()
        print(f"[launch] SIGTERM: every rank finishes its step and checkpoints it (waiting up to "
              f"{self.grace_s:g} s, checkpoint.preempt_grace_s)", flush=True)
        self._timer = threading.Timer(self.grace_s, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self) -> None:
        import os
        import sys

        print(f"error: preemption: the ranks did not checkpoint within {self.grace_s:g} s; the latest complete "
              f"checkpoint stays the resume point", file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)


def _write_remote_request(url: str) -> None:
    from pipeline import storage

    try:
        storage.write_text(url, "preemption requested by SIGTERM to the driver\n")
    except Exception as err:  # noqa: BLE001 - the local request still reaches a rank 0 on this machine
        import sys

        print(f"warning: preemption request not written to {url}: {err}", file=sys.stderr, flush=True)
