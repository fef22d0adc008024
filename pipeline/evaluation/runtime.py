"""What every evaluator loop shares: device placement, the progress bar and the
tally of skipped samples that rides along with each batch."""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from pipeline.data.eval_batches import Batch
from pipeline.data.stream import StreamBatch
from pipeline.host import usable_cpus


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def forward_threads(num_workers: int, cpus: int) -> int:
    """Intra-op threads for the forward pass on the CPU beside `num_workers` decoding loader processes: the
    cores they leave, at least one. torch's default (every core) has the forward's OpenMP threads spin on
    the cores the workers decode on: measured on 2 cores with 2 workers, ~10 ms of CPU per image in the
    forward instead of ~0.4 ms (benchmarks/RESULTS.md, Evaluation). The thread count does not change the
    results (GEMM and convolutions split outputs, not reductions, across threads: logits bitwise equal)."""
    return max(1, cpus - num_workers)


@contextmanager
def cpu_forward_threads(device: torch.device, num_workers: int) -> Iterator[None]:
    """torch.set_num_threads(forward_threads(...)) for the duration on a CPU device, then the previous
    count back. An explicit OMP_NUM_THREADS is the user's choice and is left alone."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(forward_threads(num_workers, usable_cpus()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SkipTally:
    """Counts samples the readers skipped, per reason, across all batches (and workers)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.num_samples = 0

    def track(self, batches: Iterable[StreamBatch], desc: str, total: int | None = None) -> Iterator[Batch]:
        """The stream's non-empty batches under a progress bar counting images; their skips counted here."""
        with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
            for item in batches:
                self.counts.update(item.skips)
                batch = item.batch
                if batch is None:
                    continue
                self.num_samples += len(batch.images)
                bar.update(len(batch.images))
                yield batch

    def summary(self) -> dict:
        return {"num_samples": self.num_samples, "num_skipped": dict(sorted(self.counts.items()))}
