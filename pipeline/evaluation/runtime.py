"""What every evaluator loop shares: device placement, optional autocast, the progress bar and the
tally of skipped samples that rides along with each batch."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from pipeline.evaluation.datasets import Batch


def autocast(device: torch.device, amp: bool):
    """bf16 autocast when asked (GPU evaluation); fp32 otherwise, which CPU runs always use."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SkipTally:
    """Counts samples the readers skipped, per reason, across all batches (and workers)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.num_samples = 0

    def track(self, batches: Iterable[Batch], desc: str, total: int | None = None) -> Iterator[Batch]:
        """Yield non-empty batches under a progress bar counting images."""
        with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
            for batch in batches:
                self.counts.update(batch.skipped)
                if len(batch.images) == 0:
                    continue
                self.num_samples += len(batch.images)
                bar.update(len(batch.images))
                yield batch

    def summary(self) -> dict:
        return {"num_samples": self.num_samples, "num_skipped": dict(sorted(self.counts.items()))}
