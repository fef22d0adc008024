"""A rank's stream of decoded samples from webdataset tars.

Readers are (rank, DataLoader worker) pairs. With at least as many shards as readers, each reader
takes whole shards (round-robin over an epoch-seeded shard order); with fewer shards than readers,
every reader opens every shard and keeps every num_readers-th sample, so no rank or worker starves.
The training stream is endless (epoch after epoch), so every rank can run the same number of steps
per epoch whatever the shard sizes.
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.data.shards import Shard


class SkipSample(Exception):
    """Raised by a decode function for a sample that must be skipped; the message is the reason."""


@dataclass(frozen=True)
class ReaderPlan:
    paths: list[str]
    stride: int  # keep samples whose index in the stream % stride == offset
    offset: int


def plan_reader(shards: list[Shard], reader_id: int, num_readers: int, epoch: int, seed: int, shuffle: bool) -> ReaderPlan:
    order = [s.path for s in shards]
    if shuffle:
        random.Random(hash((seed, epoch)) & 0xFFFFFFFF).shuffle(order)
    if len(order) >= num_readers:
        return ReaderPlan(order[reader_id::num_readers], 1, 0)
    return ReaderPlan(order, num_readers, reader_id)


def iter_tar_samples(paths: list[str], on_error: Callable[[str], None]) -> Iterator[dict]:
    """Raw samples ({'__key__', ext: bytes...}) from tar files; an unreadable tar is reported and skipped."""
    def handler(exn: Exception) -> bool:
        on_error(f"unreadable shard data: {type(exn).__name__}")
        return True

    def sources():
        for path in paths:
            try:
                stream = open(path, "rb")
            except OSError as err:
                on_error(f"cannot open shard: {err.strerror}")
                continue
            with stream:
                yield {"url": path, "stream": stream}

    yield from group_by_keys(tar_file_expander(sources(), handler=handler), handler=handler)


class ShardStream(IterableDataset):
    """Yields (item, skipped) where skipped is a Counter of reasons for samples dropped since the last item."""

    def __init__(self, shards: list[Shard], rank: int, world_size: int, decode: Callable[[dict], Any],
                 seed: int, shuffle: bool, shuffle_buffer: int = 1, endless: bool = True, start_epoch: int = 0):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.decode, self.seed, self.shuffle = decode, seed, shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 1
        self.endless, self.start_epoch = endless, start_epoch

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self):
        reader_id, num_readers = self._reader()
        skipped: collections.Counter = collections.Counter()
        rng = random.Random(hash((self.seed, reader_id, self.start_epoch)) & 0xFFFFFFFF)
        buffer: list = []
        epoch = self.start_epoch
        while True:
            plan = plan_reader(self.shards, reader_id, num_readers, epoch, self.seed, self.shuffle)
            decoded_this_epoch = 0
            for index, raw in enumerate(iter_tar_samples(plan.paths, lambda reason: skipped.update([reason]))):
                if index % plan.stride != plan.offset:
                    continue
                try:
                    item = self.decode(raw)
                except SkipSample as why:
                    skipped.update([str(why)])
                    continue
                decoded_this_epoch += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                pick = rng.randrange(len(buffer))
                buffer[pick], item = item, buffer[pick]
                yield item, skipped
                skipped = collections.Counter()
            if not self.endless:
                break
            if decoded_this_epoch == 0:
                # An endless loop over shards with nothing decodable would hang the rank silently.
                raise RuntimeError(f"reader {reader_id}: no decodable samples in {len(plan.paths)} shard(s); "
                                   f"skipped: {dict(skipped)}")
            epoch += 1
        rng.shuffle(buffer)
        for item in buffer:
            yield item, skipped
            skipped = collections.Counter()


def collate(batch: list) -> tuple[Any, collections.Counter]:
    """Stack the items; merge the skip reasons carried alongside them."""
    items = [item for item, _ in batch]
    skipped: collections.Counter = collections.Counter()
    for _, reasons in batch:
        skipped.update(reasons)
    return torch.utils.data.default_collate(items), skipped
