"""Exactly-once, resumable sample streams over webdataset tars.

An epoch is one virtual stream: the shards in an epoch-seeded order, concatenated, cut into blocks of
`shuffle_block` consecutive samples put in an epoch-seeded order (EpochLayout; with blocks of 1 every
position is a uniform draw, whatever order the shards were written in), shuffled in windows of
`shuffle_window` consecutive positions (a seeded permutation per window), then dealt out
in global micro-batches of `batch_size_per_rank x world_size` consecutive positions; rank r takes
slice r of each. A DataLoader worker w builds the micro-batches k = w, w + W, ... counted from where
the loader started, which is the order torch's DataLoader hands them back in. A slice that lost
samples to skips is topped up from spare positions at the end of the epoch by the training iterator
(pipeline.data.full_batches), so every rank's micro-batch is full.

So the samples a step sees are a pure function of (seed, epoch, position in the epoch, skips): the
loader's state is a small Position (epoch, offset, spares used), saved in every checkpoint. A resumed
run continues at the exact next sample, with any world size (positions do not depend on it). The tail
of an epoch that cannot fill one more global micro-batch is not read, which keeps every rank at the
same number of steps.

Evaluation (validation during training and `launch eval` alike) reads through EvalStream instead: every
sample exactly once across ranks, in shard order, with the skipped ones counted by reason.

Samples are read through pipeline.data.reader, by their members' offsets (pipeline.data.tar_index): seeking
in a local tar; on object storage one ranged request per sample with shuffle_block 1, or one per run of a
block inside one shard (EpochLayout.locate_run; kept until this reader's samples of it are read, within
reader.BLOCK_CACHE_BYTES), with the next micro-batch's requests started while the current one decodes (the
positions a worker reads next are known). A block's samples are spread over its shuffle window, hence over
ranks and loader workers: every reader that gets one of them fetches the block, so bytes read reach up to
(readers sharing a block) x bytes used. How samples are fetched never changes the stream.
Each stream yields a StreamBatch (batch, skips, position).
"""
from __future__ import annotations

import bisect
import collections
import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.permute import Permutation
from pipeline.data.reader import TarSamples, read_each
from pipeline.data.shards import Shard


# Micro-batches of its own whose block runs a loader worker requests ahead (shuffle_block > 1; memory stays
# within reader.BLOCK_CACHE_BYTES): a few, so a new window's blocks are in before its first micro-batch.
RUN_LOOKAHEAD = 4


@dataclass(frozen=True)
class Position:
    """Where a stream stands: the next micro-batch starts at `offset` of epoch `epoch`, and the last
    `spares` positions of that epoch were already used to top micro-batches up (full_batches.py)."""

    epoch: int = 0
    offset: int = 0
    spares: int = 0


@dataclass
class StreamBatch:
    """One micro-batch as a stream hands it over."""

    batch: Any
    """The collated samples; a ShortBatch (a list) from ResumableStream when some were skipped, None from
    EvalStream when every sample of the batch was."""
    skips: collections.Counter
    """Reason (pipeline.data.reasons) -> samples of this micro-batch that were skipped."""
    position: Position | None = None
    """Training: where the stream stands after this micro-batch (saved in checkpoints); None in evaluation."""

    def pin_memory(self) -> "StreamBatch":
        """DataLoader(pin_memory=True) calls this: the batch's tensors are pinned, as in a plain tuple."""
        return StreamBatch(_pinned(self.batch), self.skips, self.position)


def _pinned(value):
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, list):
        return type(value)(_pinned(v) for v in value)  # a collated batch, or a ShortBatch of samples
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_pinned(v) for v in value)
    return value


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(derived_seed(seed, epoch, 0x5A)).shuffle(order)
    return order


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts (SeedSequence): every seeded draw of a stream derives from one."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class EpochLayout:
    """Maps a stream position of one epoch to (shard path, sample index inside the shard).

    The epoch's samples (its shards in epoch order, concatenated) are cut into blocks of `block_size`
    consecutive samples, the blocks put in an epoch-seeded order (a table-free Permutation), and that
    sequence shuffled in windows of `shuffle_window` positions. With block_size 1 every position is an
    independent, uniformly drawn sample of the epoch, whatever order the shards were written in. Larger
    blocks keep a window's reads within window / block_size runs of consecutive samples, and mix only
    when the window holds many blocks (launch's preflight warns when it cannot)."""

    def __init__(self, shards: list[Shard], seed: int, epoch: int, shuffle: bool, shuffle_window: int,
                 block_size: int = 1):
        self.order = epoch_order(shards, seed, epoch, shuffle)
        self.starts = np.cumsum([0] + [s.num_samples for s in self.order]).tolist()
        self.num_samples = self.starts[-1]
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.window = max(1, shuffle_window)
        self.block_size = max(1, block_size)
        num_blocks = -(-self.num_samples // self.block_size)
        self.blocks = Permutation(num_blocks, derived_seed(seed, epoch, 0xB1)) if shuffle and num_blocks else None
        # Where the last block, the only one that may be short, lands in the block order.
        self.last_size = self.num_samples - (num_blocks - 1) * self.block_size
        self.last_slot = int(self.blocks.inverse(num_blocks - 1)[0]) if self.blocks is not None else 0
        self._windows: dict[int, np.ndarray] = {}

    def _window_sources(self, window: int) -> np.ndarray:
        """The sample (index into the epoch's concatenated shards) at each position of one window."""
        sources = self._windows.get(window)
        if sources is None:
            first = window * self.window
            size = min(self.window, self.num_samples - first)
            order = np.random.default_rng(derived_seed(self.seed, self.epoch, window, 0xC3)).permutation(size)
            sources = self._unblock(first + order)
            # Workers read windows in order; the training iterator's spares read the epoch's last ones.
            self._windows = {w: v for w, v in self._windows.items() if w == window - 1}
            self._windows[window] = sources
        return sources

    def _unblock(self, indices: np.ndarray) -> np.ndarray:
        """Indices into the block-ordered sequence -> indices into the concatenated shards."""
        size, partial_at = self.block_size, self.last_slot * self.block_size
        after = indices >= partial_at + self.last_size  # past the short block: shift by what it lacks
        shifted = np.where(after, indices + (size - self.last_size), indices)
        slot, inside = np.divmod(shifted, size)
        return self.blocks(slot) * size + inside

    def _source(self, position: int) -> int:
        """Index into the epoch's concatenated shards of the sample at `position`."""
        if self.blocks is None:  # evaluation: shard order, as written
            return position
        window, inside = divmod(position, self.window)
        return int(self._window_sources(window)[inside])

    def locate(self, position: int) -> tuple[str, int]:
        source = self._source(position)
        shard = bisect.bisect_right(self.starts, source) - 1
        return self.order[shard].path, source - self.starts[shard]

    def locate_run(self, position: int) -> tuple[str, int, int, int]:
        """(shard path, sample index, first, end): locate's answer and the run [first, end) of sample indices
        of that shard in the same block (a block may straddle two shards: each side is a run). A reader
        fetches a remote run with one request; the stream is the same whatever the runs."""
        source = self._source(position)
        shard = bisect.bisect_right(self.starts, source) - 1
        base = self.starts[shard]
        if self.blocks is None:
            return self.order[shard].path, source - base, source - base, source - base + 1
        block_first = source - source % self.block_size
        first = max(block_first, base)
        end = min(block_first + self.block_size, self.num_samples, self.starts[shard + 1])
        return self.order[shard].path, source - base, first - base, end - base


def independent_share(shuffle_window: int, shuffle_block: int, global_batch: int) -> float:
    """About what share of a global micro-batch's samples are independent draws: the expected number of
    distinct blocks among its positions over its size. 1.0 with shuffle_block 1; with larger blocks a
    batch holds several consecutive samples of one block (in class-ordered shards, one class) unless the
    window holds many more blocks than the batch has samples."""
    if shuffle_block == 1:
        return 1.0
    share = min(1.0, global_batch / shuffle_window)  # chance that a given sample of the window is in the batch
    blocks = shuffle_window / shuffle_block * (1.0 - (1.0 - share) ** shuffle_block)
    return blocks / min(global_batch, shuffle_window)


def mixing_shortfall(shuffle_window: int, shuffle_block: int, global_batch: int,
                     num_classes: int | None = None, min_share: float = 0.75) -> str | None:
    """Why this layout cannot mix shards written in class order (one line), or None when it can."""
    if shuffle_block == 1:
        return None  # every position is an independent draw
    blocks = shuffle_window // shuffle_block
    share = independent_share(shuffle_window, shuffle_block, global_batch)
    if share < min_share:
        needed = shuffle_window
        while independent_share(needed, shuffle_block, global_batch) < min_share:
            needed *= 2
        return (f"data.shuffle_block {shuffle_block} with data.shuffle_buffer {shuffle_window}: a global "
                f"micro-batch of {global_batch} holds runs of consecutive samples (about {share:.0%} independent "
                f"draws), so shards written in class order give batches of few classes; use shuffle_block 1, "
                f"or shuffle_buffer >= {needed}")
    if num_classes and blocks < 2 * num_classes:
        return (f"data.shuffle_block {shuffle_block} with data.shuffle_buffer {shuffle_window}: a shuffle window "
                f"holds {blocks} blocks of consecutive samples, fewer than 2 per class ({num_classes} classes); "
                f"use shuffle_block 1, or shuffle_buffer >= {2 * num_classes * shuffle_block}")
    return None


def as_is(item):
    """collate_fn for DataLoader(batch_size=None): the streams batch themselves. DataLoader's default
    (default_convert) would copy the skip Counter and then update() the copy with the same counts,
    doubling every reason."""
    return item


def seed_sample_rng(seed: int, epoch: int, position: int, all_devices: bool = True) -> None:
    """Augmentation randomness of a sample depends only on the sample, never on worker or resume.

    all_devices=False seeds the CPU generator only: loader workers draw nothing on a GPU, and
    torch.manual_seed's lazy CUDA seeding costs ~0.1 ms per call (it records a stack trace)."""
    value = derived_seed(seed, epoch, position, 0x77)
    random.seed(value)
    np.random.seed(value)
    if all_devices:
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)


class ShortBatch(list):
    """The decoded samples of a micro-batch slice that lost some to skips. The training iterator
    (full_batches.FullBatches) tops it up with spare samples, then collates it."""


class ResumableStream(IterableDataset):
    """One rank's share of the global micro-batches (loader-worker side), from `start` on, forever.

    Yields a StreamBatch per micro-batch, positioned after it: the collated batch when every sample of the
    rank's slice decoded, else a ShortBatch of the samples that did. Training reads it through
    full_batches.FullBatches, which tops short slices up so every rank's micro-batch is full."""

    def __init__(self, shards: list[Shard], rank: int, world_size: int, batch_size_per_rank: int,
                 decode: Callable[[dict], Any], seed: int, shuffle_window: int, start: Position = Position(),
                 collate: Callable[[list], Any] = torch.utils.data.default_collate, shuffle_block: int = 1):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.decode, self.seed = batch_size_per_rank, decode, seed
        self.shuffle_window, self.shuffle_block = shuffle_window, shuffle_block
        self.start, self.collate = start, collate
        self.global_batch = batch_size_per_rank * world_size
        self._layouts: dict[int, EpochLayout] = {}
        self._check_size()

    def _check_size(self) -> None:
        if sum(s.num_samples for s in self.shards) < self.global_batch:
            raise ValueError("fewer samples than one global micro-batch")

    def layout(self, epoch: int) -> EpochLayout:
        """The position -> sample map of one epoch (the last two asked for are kept)."""
        layout = self._layouts.get(epoch)
        if layout is None:
            layout = EpochLayout(self.shards, self.seed, epoch, True, self.shuffle_window, self.shuffle_block)
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = layout
        return layout

    def sample_key(self, epoch: int, position: int) -> tuple[int, int]:
        """(epoch, position) that seeds a sample's augmentation."""
        return epoch, position

    def read(self, layout, position: int, store: "TarSamples"):
        """The decoded sample at `position` of `layout`'s epoch; raises SkipSample with the reason."""
        path, index, first, end = layout.locate_run(position)
        seed_sample_rng(self.seed, *self.sample_key(layout.epoch, position), all_devices=False)
        return self.decode(store.read(path, index, (first, end)))

    def _locations(self, layout, first: int) -> list[tuple[str, int, int, int]]:
        """The (shard, index, run first, run end) of this rank's slice of the global micro-batch at `first`."""
        begin = first + self.rank * self.batch_size
        return [layout.locate_run(p) for p in range(begin, begin + self.batch_size)]

    def micro_batches(self) -> Iterator[tuple[Any, int]]:
        """(layout, first position) of every global micro-batch from the start position on, forever.
        Micro-batches never reach into the spares the start position says were used."""
        epoch, offset, spares = self.start.epoch, self.start.offset, self.start.spares
        while True:
            layout = self.layout(epoch)
            while offset + self.global_batch <= layout.num_samples - spares:
                yield layout, offset
                offset += self.global_batch
            epoch, offset, spares = epoch + 1, 0, 0

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        store = TarSamples()
        mine = (batch for k, batch in enumerate(self.micro_batches()) if k % workers == worker)
        # Samples: the next micro-batch's requests are in flight while this one decodes. Runs of blocks:
        # RUN_LOOKAHEAD of them, so the blocks of the next shuffle window (all needed at once, as its first
        # micro-batch touches most of them) arrive before the window starts.
        ahead = collections.deque(itertools.islice(mine, RUN_LOOKAHEAD if self.shuffle_block > 1 else 1))
        for upcoming in ahead:
            store.prefetch(self._locations(*upcoming))
        while True:
            layout, first = ahead.popleft()
            ahead.append(next(mine))  # endless: there is always a next micro-batch
            store.prefetch(self._locations(*ahead[-1]))
            begin = first + self.rank * self.batch_size
            items, skipped = read_each(lambda position: self.read(layout, position, store),
                                       range(begin, begin + self.batch_size))
            batch = self.collate(items) if len(items) == self.batch_size else ShortBatch(items)
            spares = self.start.spares if layout.epoch == self.start.epoch else 0
            yield StreamBatch(batch, skipped, Position(layout.epoch, first + self.global_batch, spares))


class EvalStream(IterableDataset):
    """Every sample exactly once, in shard order, for evaluation: rank r takes batches r, r + world, ...
    of `batch_size` consecutive samples (the last one may be short); no padding, no shuffle.

    Yields one StreamBatch per batch, with no position: the collated samples that decoded (None when none
    did) and the reasons of those that did not, so every skip is counted even in a batch with nothing
    to score. Loader worker w of W takes this rank's batches w, w + W, ..."""

    def __init__(self, shards: list[Shard], rank: int, world_size: int, batch_size: int,
                 decode: Callable[[dict], Any], collate: Callable[[list], Any] = torch.utils.data.default_collate):
        self.layout = EpochLayout(shards, 0, 0, False, 1)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.decode, self.collate = decode, collate

    def _batch_starts(self, worker: int = 0, workers: int = 1) -> list[int]:
        """First positions of the batches a loader worker of this rank reads."""
        mine = range(self.rank * self.batch_size, self.layout.num_samples, self.batch_size * self.world_size)
        return [begin for k, begin in enumerate(mine) if k % workers == worker]

    def _positions(self, begin: int) -> range:
        return range(begin, min(begin + self.batch_size, self.layout.num_samples))

    def _located(self, begin: int) -> dict[int, tuple[str, int, int, int]]:
        """Position -> (shard, index, run first, run end) of one batch: its samples in one shard are one run
        (a remote reader fetches them with one request)."""
        positions = self._positions(begin)
        starts = self.layout.starts
        located = {}
        for position in positions:
            shard = bisect.bisect_right(starts, position) - 1
            first = max(positions.start, starts[shard]) - starts[shard]
            end = min(positions.stop, starts[shard + 1]) - starts[shard]
            located[position] = (self.layout.order[shard].path, position - starts[shard], first, end)
        return located

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        store = TarSamples()
        batches = self._batch_starts(worker, workers)
        if batches:
            store.prefetch(self._located(batches[0]).values())
        for j, begin in enumerate(batches):
            if j + 1 < len(batches):  # the next batch's requests run while this one decodes
                store.prefetch(self._located(batches[j + 1]).values())
            located = self._located(begin)
            items, skipped = read_each(
                lambda position: self.decode(store.read(*located[position][:2], located[position][2:])),
                self._positions(begin))
            yield StreamBatch(self.collate(items) if items else None, skipped)


def eval_loader(stream: EvalStream, num_workers: int) -> torch.utils.data.DataLoader:
    """The DataLoader evaluation iterates: the stream's StreamBatches as they are, read by `num_workers`
    processes (0: in this process)."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=as_is, num_workers=num_workers, persistent_workers=False,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
    )
