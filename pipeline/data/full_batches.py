"""Every rank's training micro-batch is full, whatever was skipped.

open_clip's ClipLoss gathers features from every rank and SigLIP passes them to neighbours: both need
the same batch size on every rank (gloo aborts on 8 vs 7; NCCL hangs or reads garbage), and BatchNorm
statistics and gradient averaging assume it too. A sample that cannot be used (corrupt image, empty
caption) is therefore replaced, deterministically, so exactly-once still holds.

How: the global micro-batches keep their fixed positions (first + [0, G), rank r takes slice r), so the
loader workers still build them independently and ahead of time. Replacements, the *spares*, come from
the end of the epoch, walking backwards: spare j is position num_samples - 1 - j. After each
micro-batch's slices are decoded, the ranks exchange how many samples each is short (one all_gather of
an int per rank); spares are then dealt in rank order (rank 0 takes the next d_0, rank 1 the d_1 after
them, ...), decoded by the rank that takes them, and the exchange repeats while a spare itself was
skipped. Every rank computes the same plan from the same numbers, so the state stays one small
Position(epoch, offset, spares): the micro-batches before `offset` and the last `spares` positions were
used, nothing else. An epoch ends when the next micro-batch would reach into the used spares; a
micro-batch whose shortfall the remaining spares cannot cover is left to the epoch's tail with the rest
(never read, like the remainder shorter than one global micro-batch), so the tail is under one global
micro-batch plus that shortfall. Skipped samples (spares included) are counted with their reasons.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable

import torch

from pipeline.data.reader import TarSamples, read_each
from pipeline.data.stream import Position, ResumableStream, ShortBatch, StreamBatch, as_is

Exchange = Callable[[int], list[int]]
"""all_gather of one int: this rank's value in, every rank's value (in rank order) out."""


def training_batches(stream: ResumableStream, num_workers: int, exchange: Exchange | None = None) -> "FullBatches":
    """The training iterable of one rank: the stream read by a DataLoader, topped up to full batches.
    `exchange` defaults to one over torch.distributed (needed when the world size is above 1)."""
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=as_is, num_workers=num_workers, persistent_workers=False,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
    )
    return FullBatches(loader, stream, exchange or default_exchange(stream.world_size))


class FullBatches:
    """Iterable of StreamBatch (batch, skips, Position after the batch); every batch holds exactly
    batch_size_per_rank samples."""

    def __init__(self, loader: Iterable, stream: ResumableStream, exchange: Exchange):
        self.loader, self.stream, self.exchange = loader, stream, exchange

    def __iter__(self) -> "_FullBatchIterator":
        return _FullBatchIterator(iter(self.loader), self.stream, self.exchange)


class _FullBatchIterator:
    def __init__(self, loader_iterator, stream: ResumableStream, exchange: Exchange):
        self.loader_iterator = loader_iterator  # the DataLoader's (benchmark-data reads its worker pids)
        self.stream, self.exchange = stream, exchange
        self.store = TarSamples()
        self.epoch, self.spares = stream.start.epoch, stream.start.spares
        self.epoch_ended = False  # spares ran out: this epoch's remaining micro-batches are its tail

    def __iter__(self):
        return self

    def __next__(self) -> StreamBatch:
        global_batch = self.stream.global_batch
        while True:
            item = next(self.loader_iterator)
            batch, skipped, where = item.batch, item.skips, item.position
            if where.epoch != self.epoch:
                self.epoch, self.spares, self.epoch_ended = where.epoch, 0, False
            first, layout = where.offset - global_batch, self.stream.layout(where.epoch)
            # Identical on every rank (same positions, same exchanged numbers): all drop the same ones.
            if self.epoch_ended or first + global_batch > layout.num_samples - self.spares:
                continue
            short = sum(skipped.values())
            topped = self._top_up(layout, first, short)
            if topped is None:
                self.epoch_ended = True
                continue
            extra, extra_skipped, self.spares = topped
            if isinstance(batch, ShortBatch):
                batch = self.stream.collate(list(batch) + extra)
            skipped.update(extra_skipped)
            return StreamBatch(batch, skipped, Position(where.epoch, where.offset, self.spares))

    def _top_up(self, layout, first: int, short: int) -> tuple[list, collections.Counter, int] | None:
        """(spare samples for this rank, their skip reasons, spares used after this micro-batch), or None
        when the epoch's remaining positions cannot fill every rank (the micro-batch joins the tail)."""
        stream, rank = self.stream, self.stream.rank
        spares, extra, skipped = self.spares, [], collections.Counter()
        while True:
            shortfalls = self.exchange(short)
            assert len(shortfalls) == stream.world_size, shortfalls
            needed = sum(shortfalls)
            if needed == 0:
                return extra, skipped, spares
            if first + stream.global_batch > layout.num_samples - spares - needed:
                return None
            mine = spares + sum(shortfalls[:rank])
            items, lost = read_each(lambda j: stream.read(layout, layout.num_samples - 1 - j, self.store),
                                    range(mine, mine + shortfalls[rank]))
            extra.extend(items)
            skipped.update(lost)
            short = sum(lost.values())
            spares += needed


# ---------------------------------------------------------------- exchanges


def default_exchange(world_size: int) -> Exchange:
    if world_size == 1:
        return _alone
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise ValueError(f"a {world_size}-rank training stream needs torch.distributed initialised with "
                         f"{world_size} ranks (or an explicit exchange, e.g. LocalExchange)")
    return ProcessGroupExchange()


def _alone(value: int) -> list[int]:
    return [value]


class ProcessGroupExchange:
    """all_gather over a CPU (gloo) group: the default group when it is gloo, else a gloo group made
    here, on every rank at once (the loaders are built at the same point of the loop on every rank).
    A CPU group keeps this off the accelerator's stream: no device sync in the data path."""

    def __init__(self):
        import torch.distributed as dist

        self.world_size = dist.get_world_size()
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __call__(self, value: int) -> list[int]:
        import torch.distributed as dist

        gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(gathered, torch.tensor([value], dtype=torch.int64), group=self.group)
        return [int(t.item()) for t in gathered]


class LocalExchange:
    """The ranks of one process, each in its own thread (tests and tools): values meet at a barrier."""

    def __init__(self, world_size: int, timeout_seconds: float | None = None):
        self._values = [0] * world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_seconds)

    def for_rank(self, rank: int) -> Exchange:
        def exchange(value: int) -> list[int]:
            self._values[rank] = value
            self._barrier.wait()
            values = list(self._values)
            self._barrier.wait()  # nobody overwrites a value before every rank has read them all
            return values

        return exchange

    def abort(self) -> None:
        """Release the other ranks (with BrokenBarrierError) when one of them failed."""
        self._barrier.abort()
