"""Weighted mixing of several training sources ('a::b' with data.train_weights), resumable exactly.

The mixed stream is one virtual sequence of positions 0, 1, 2, ... Positions come in blocks of
BLOCK; block b gives each source a seeded multinomial share of its positions (mean weight /
sum(weights)) and spreads them in a seeded order. A source's positions read that source's own
virtual stream (its epochs laid out as pipeline.data.stream lays out one source: shard order, block
order, windows), so each source is read exactly once per its own epoch, however often it is drawn.

Like ResumableStream, the samples of a step are a pure function of (seed, position): the loader's
state is a small Position (segment of SEGMENT positions, next position in it, spares used from its end
to keep micro-batches full), saved in every checkpoint, independent of the world size. open_clip instead resamples whole shards by weight; per-position draws keep the mix
exact in every block even with few, uneven shards.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.data.shards import Shard
from pipeline.data.stream import EpochLayout, Position, ResumableStream, derived_seed

BLOCK = 4096  # positions per source-assignment block: the mix is exact to one multinomial draw per block
# Positions per segment: the mixed stream's stand-in for an epoch (full_batches.py takes spares from
# its end). Under one global micro-batch plus a shortfall per segment is left unread, ~0.1% at 32k.
SEGMENT = 4096 * BLOCK
_CHECKPOINT_BLOCKS = 256  # _block_starts remembers every 256th block's starts: replays stay short


class SourceMix:
    """Which source, and which position of that source's own stream, a mixed position reads."""

    def __init__(self, sources: Sequence[list[Shard]], weights: Sequence[float], seed: int, shuffle_window: int,
                 shuffle_block: int = 1):
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
        self.seed, self.shuffle_window, self.shuffle_block = seed, shuffle_window, shuffle_block
        self._starts: tuple[int, np.ndarray] = (0, np.zeros(len(self.sources), dtype=np.int64))
        self._checkpoints: dict[int, np.ndarray] = {0: self._starts[1]}
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._layouts: dict[int, EpochLayout] = {}

    def _counts(self, block: int) -> np.ndarray:
        return np.random.default_rng(derived_seed(self.seed, block, 0x3D)).multinomial(BLOCK, self.probs)

    def _block_starts(self, block: int) -> np.ndarray:
        """Samples each source gave to blocks before `block`, replayed from the nearest known block
        (the last one asked for, or a remembered one: spares walk backwards from a segment's end)."""
        known, starts = self._starts
        if block < known:
            known = block - block % _CHECKPOINT_BLOCKS
            while known not in self._checkpoints:
                known -= _CHECKPOINT_BLOCKS
            starts = self._checkpoints[known]
        for b in range(known, block):
            if b % _CHECKPOINT_BLOCKS == 0:
                self._checkpoints.setdefault(b, starts)
            starts = starts + self._counts(b)
        self._starts = (block, starts)
        return starts

    def _assign(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in the block, index in that source's stream)."""
        if self._block is None or self._block[0] != block:
            counts = self._counts(block)
            ids = np.random.default_rng(derived_seed(self.seed, block, 0x4E)).permutation(
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
                                 self.shuffle_window, self.shuffle_block)
            self._layouts[source] = layout
        return (source, *layout.locate(offset))

    def locate_run(self, position: int) -> tuple[str, int, int, int]:
        """(shard path, sample index, run first, run end) of a mixed position (EpochLayout.locate_run)."""
        source, index = self.source_of(position)
        self.locate(position)  # the source's layout for this position's epoch
        return self._layouts[source].locate_run(index % self.sizes[source])


class MixedSegment:
    """Positions [segment x SEGMENT, (segment + 1) x SEGMENT) of the mixed stream, as one epoch of a
    single-source stream looks to ResumableStream and FullBatches (its last positions are the spares)."""

    def __init__(self, mix: SourceMix, segment: int):
        self.mix, self.epoch, self.num_samples = mix, segment, SEGMENT

    def locate(self, position: int) -> tuple[str, int]:
        return self.mix.locate(self.epoch * SEGMENT + position)[1:]

    def locate_run(self, position: int) -> tuple[str, int, int, int]:
        return self.mix.locate_run(self.epoch * SEGMENT + position)


class MixedStream(ResumableStream):
    """Yields a StreamBatch per micro-batch (batch, skips, Position after it), like ResumableStream.

    The endless mixed stream is cut into segments of SEGMENT positions that play the part of epochs:
    Position(segment, offset in it, spares used from its end)."""

    def __init__(self, sources: Sequence[list[Shard]], weights: Sequence[float], rank: int, world_size: int,
                 batch_size_per_rank: int, decode: Callable[[dict], Any], seed: int, shuffle_window: int,
                 start: Position = Position(),
                 collate: Callable[[list], Any] = torch.utils.data.default_collate, shuffle_block: int = 1):
        self.mix = SourceMix(sources, weights, seed, shuffle_window, shuffle_block)
        super().__init__([s for source in sources for s in source], rank, world_size, batch_size_per_rank,
                         decode, seed, shuffle_window, start, collate, shuffle_block)

    def _check_size(self) -> None:
        if self.global_batch > SEGMENT:
            raise ValueError(f"a global micro-batch of {self.global_batch} exceeds the mixing segment ({SEGMENT})")

    def layout(self, epoch: int) -> MixedSegment:
        return MixedSegment(self.mix, epoch)

    def sample_key(self, epoch: int, position: int) -> tuple[int, int]:
        return 0, epoch * SEGMENT + position  # seeded by the mixed position, whatever the segment size
