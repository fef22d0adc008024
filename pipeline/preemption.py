"""Preemption: a SIGTERM (or the driver's request file) becomes a complete checkpoint at an agreed step.

Spot and preemptible nodes get SIGTERM some seconds before they go. Any rank may be the one told, so
after every optimizer step the ranks agree (one all-reduce of a flag) whether anyone was: then each
finishes that step, all write the checkpoint of that step together, and the run stops with
EXIT_PREEMPTED. Relaunching the same command resumes at the exact next sample.

Under Ray Train the training function runs in a thread of the worker actor, where Python cannot install
signal handlers; the driver's handler (launch pretrain) writes `<run_dir>/PREEMPT` instead and rank 0
reads it after each step. A worker process that is killed outright (SIGKILL, a lost node) is Ray's
fault-tolerance path: the group restarts from the last complete checkpoint.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later; a scheduler can tell it from a crash (1) or success (0)
REQUEST_FILE = "PREEMPT"  # written by the driver on SIGTERM, removed when a run starts
PREEMPTED_RECORD = "preempted.json"  # written by rank 0: the step and checkpoint a preemption left


def request_file(run_dir: Path) -> Path:
    return Path(run_dir) / REQUEST_FILE


class Preemption:
    """Whether this step is the last one because some rank (or the driver) was told to stop."""

    def __init__(self, run_dir: Path, rank: int, world_size: int):
        self.requested = False
        self.rank, self.world_size = rank, world_size
        self.request = request_file(run_dir)
        import torch.distributed as dist  # here, so that the launcher imports this module without torch

        # The flag travels on a CPU group: an NCCL all-reduce of a device tensor would sync the GPU stream
        # after every step. Gloo on loopback or the cluster network costs tens of microseconds.
        self.group = None
        if world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        if callable(self._previous):  # the driver's handler, when driver and rank share a process (--no-ray)
            self._previous(signum, frame)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (or the driver asked): call after each step."""
        import torch
        import torch.distributed as dist

        local = self.requested or (self.rank == 0 and self.request.exists())
        if self.world_size == 1 or not dist.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def clear(run_dir: Path) -> None:
    """A new launch starts unpreempted: drop the previous request and record."""
    for name in (REQUEST_FILE, PREEMPTED_RECORD):
        (Path(run_dir) / name).unlink(missing_ok=True)


def was_preempted(run_dir: Path) -> dict | None:
    import json

    record = Path(run_dir) / PREEMPTED_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


class DriverHandler:
    """SIGTERM to the driver: ask the ranks to checkpoint (request file), and bound the wait.

    Used as a context manager around the training call; outside it SIGTERM keeps its previous meaning."""

    def __init__(self, run_dir: Path, grace_s: float):
        self.run_dir, self.grace_s = Path(run_dir), grace_s
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
