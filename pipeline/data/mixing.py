"""Weighted mixing of several training sources ('a::b' with data.train_weights), resumable exactly.

The mixed stream is one virtual sequence of positions 0, 1, 2, ... Positions come in blocks of
BLOCK; block b gives each source a seeded multinomial share of its positions (mean weight /
sum(weights)) and spreads them in a seeded order. A source's positions read that source's own
virtual stream (its epochs in epoch-seeded shard order, window-shuffled, as pipeline.data.stream lays
out one source), so each source is read exactly once per its own epoch, however often it is drawn.

Like ResumableStream, the samples of a step are a pure function of (seed, position): the loader's
state is one integer (Position(0, next mixed position)), saved in every checkpoint, independent of
the world size. open_clip instead resamples whole shards by weight; per-position draws keep the mix
exact in every block even with few, uneven shards.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.reader import SkipSample
from pipeline.data.shards import Shard
from pipeline.data.stream import EpochLayout, Position, TarSamples, _seed, seed_sample_rng

BLOCK = 4096  # positions per source-assignment block: the mix is exact to one multinomial draw per block


class SourceMix:
    """Which source, and which position of that source's own stream, a mixed position reads."""

    def __init__(self, sources: Sequence[list[Shard]], weights: Sequence[float], seed: int, shuffle_window: int):
        if len(sources) != len(weights) or len(sources) < 2:
            raise ValueError(f"mixing needs one weight per source and >= 2 sources, got {len(sources)} "
                             f"sources and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixing weights must be > 0, got {list(weights)}")
        self.sources = [list(s) for s in sources]
        self.sizes = [sum(shard.num_samples for shard in s) for s in self.sources]
        if min(self.sizes) < 1:
            raise ValueError("every mixed source needs at least one sample")
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.seed, self.shuffle_window = seed, shuffle_window
        self._starts: tuple[int, np.ndarray] = (0, np.zeros(len(self.sources), dtype=np.int64))
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._layouts: dict[int, EpochLayout] = {}

    def _counts(self, block: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, block, 0x3D)).multinomial(BLOCK, self.probs)

    def _block_starts(self, block: int) -> np.ndarray:
        """Samples each source gave to blocks before `block` (replayed from the last one asked for)."""
        known, starts = self._starts
        if block < known:
            known, starts = 0, np.zeros(len(self.sources), dtype=np.int64)
        for b in range(known, block):
            starts = starts + self._counts(b)
        self._starts = (block, starts)
        return starts

    def _assign(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in the block, index in that source's stream)."""
        if self._block is None or self._block[0] != block:
            counts = self._counts(block)
            ids = np.random.default_rng(_seed(self.seed, block, 0x4E)).permutation(
                np.repeat(np.arange(len(self.sources)), counts))
            index = np.empty(BLOCK, dtype=np.int64)
            starts = self._block_starts(block)
            for source in range(len(self.sources)):
                mask = ids == source
                index[mask] = starts[source] + np.arange(int(mask.sum()))
            self._block = (block, ids, index)
        return self._block[1], self._block[2]

    def source_of(self, position: int) -> tuple[int, int]:
        block, inside = divmod(position, BLOCK)
        ids, index = self._assign(block)
        return int(ids[inside]), int(index[inside])

    def locate(self, position: int) -> tuple[int, str, int]:
        """(source, shard path, sample index in the shard) of a mixed position."""
        source, index = self.source_of(position)
        epoch, offset = divmod(index, self.sizes[source])
        layout = self._layouts.get(source)
        if layout is None or layout.epoch != epoch:
            # Each source shuffles with its own seed, so two sources never share an order.
            layout = EpochLayout(self.sources[source], self.seed + 7919 * (source + 1), epoch, True,
                                 self.shuffle_window)
            self._layouts[source] = layout
        return (source, *layout.locate(offset))


class MixedStream(IterableDataset):
    """Yields (batch, skipped reasons Counter, Position after this micro-batch), like ResumableStream."""

    def __init__(self, sources: Sequence[list[Shard]], weights: Sequence[float], rank: int, world_size: int,
                 batch_size_per_rank: int, decode: Callable[[dict], Any], seed: int, shuffle_window: int,
                 start: Position = Position(),
                 collate: Callable[[list], Any] = torch.utils.data.default_collate):
        self.mix = SourceMix(sources, weights, seed, shuffle_window)
        self.rank, self.batch_size, self.decode, self.seed = rank, batch_size_per_rank, decode, seed
        self.global_batch = batch_size_per_rank * world_size
        # The mixed stream has no epochs: a position saved by a single-source run restarts the mix.
        self.start_offset = start.offset if start.epoch == 0 else 0
        self.collate = collate

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        store = TarSamples()
        first = self.start_offset + worker * self.global_batch
        while True:
            begin = first + self.rank * self.batch_size
            items, skipped = [], collections.Counter()
            for position in range(begin, begin + self.batch_size):
                try:
                    _, path, index = self.mix.locate(position)
                    seed_sample_rng(self.seed, 0, position, all_devices=False)
                    items.append(self.decode(store.read(path, index)))
                except SkipSample as why:
                    skipped.update([str(why)])
            if not items:
                raise RuntimeError(f"rank {self.rank}: every sample of a micro-batch was undecodable: {dict(skipped)}")
            yield self.collate(items), skipped, Position(0, first + self.global_batch)
            first += workers * self.global_batch
