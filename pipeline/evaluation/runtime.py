"""What every evaluator loop shares: device placement, the progress bar and the
tally of skipped samples that rides along with each batch."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from pipeline.data.eval_batches import Batch
from pipeline.data.stream import StreamBatch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
