"""Weighted mixing of several training sources ('a::b' with data.train_weights).

Each source is its own endless ShardStream (its own rank/worker split and shuffle buffer); every sample
draws its source with probability weight / sum(weights) from a reader-seeded RNG, so the mix holds
in every batch in expectation, whatever the sources' sizes (open_clip resamples shards with weights
instead; per-sample draws keep the proportion exact in expectation even with few, uneven shards).
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

from torch.utils.data import IterableDataset, get_worker_info


class MixedStream(IterableDataset):
    """Yields (item, skipped) like ShardStream, drawing each item from a source chosen by weight."""

    def __init__(self, sources: Sequence[Iterable], weights: Sequence[float], seed: int, start_epoch: int = 0,
                 rank: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixing weights must be > 0, got {list(weights)}")
        self.sources, self.weights = list(sources), [float(w) for w in weights]
        self.seed, self.start_epoch = seed, start_epoch
        # Sources that are ShardStreams carry the rank; plain iterables (tests) use the argument.
        self.rank = getattr(self.sources[0], "rank", rank)

    def __iter__(self):
        info = get_worker_info()
        reader = (self.rank, info.id if info else 0)
        rng = random.Random(hash((self.seed, "mix", reader, self.start_epoch)) & 0xFFFFFFFF)
        iterators = [iter(source) for source in self.sources]
        indices = range(len(iterators))
        while True:
            index = rng.choices(indices, weights=self.weights)[0]
            try:
                # The skip reasons a source counted ride along with its next item, as in ShardStream.
                yield next(iterators[index])
            except StopIteration:
                return  # a finite source ends the mix (endless training sources never do)
