"""How a sample is read out of a tar shard: the one reader that training, validation and `launch eval` share.

* TarSamples: random access to a shard's samples through their members' offsets (tar_index.py);
* IMAGE_EXTENSIONS and decode_image: which member is the image, and how it becomes a PIL image;
* read_each: the one decode/skip loop: decoded samples in order, the rest counted by reason
  (pipeline.data.reasons).

Which positions a rank reads, and in which order, is pipeline.data.stream's business.
"""
from __future__ import annotations

import collections
import io
import tarfile
from typing import Any, Callable, Iterable

from PIL import Image

from pipeline import storage
from pipeline.data import reasons
from pipeline.data.reasons import SkipSample
from pipeline.data.tar_index import Index, Members, read_index

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""A sample's image member is the first of these it holds (webdataset extensions, lower case)."""

# Threads per loader worker that read remote samples ahead (one request each in flight); local shards
# are read in place. 16 hides ~10-50 ms object-store latency behind decoding at a few hundred samples/s.
PREFETCH_THREADS = 16


def image_bytes(raw: dict) -> bytes:
    """The encoded image of a raw sample; SkipSample(NO_IMAGE) when it has none."""
    key = next((k for k in IMAGE_EXTENSIONS if k in raw), None)
    if key is None:
        raise SkipSample(reasons.NO_IMAGE)
    return raw[key]


def decode_image(raw: dict) -> Image.Image:
    """The sample's image, decoded to RGB; SkipSample with the reason when it has none or it is corrupt."""
    data = image_bytes(raw)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # PIL raises many types for corrupt data
        raise SkipSample(reasons.CORRUPT_IMAGE) from None
    return image.convert("RGB")


def read_each(read: Callable[[int], Any], positions: Iterable[int]) -> tuple[list, collections.Counter]:
    """(what `read` returned for each position, in order, leaving out skipped ones; reason -> count of
    the skipped). `read` raises SkipSample for a sample that cannot be used."""
    items: list = []
    skipped: collections.Counter = collections.Counter()
    for position in positions:
        try:
            items.append(read(position))
        except SkipSample as why:
            skipped[str(why)] += 1
    return items, skipped


class TarSamples:
    """Random access to the samples of tar shards through their members' offsets (tar_index.py).

    Local shards are read by seeking; remote ones (s3://, gs://, https://) by one ranged request per sample
    (its members are consecutive in the tar). `prefetch` starts the requests of samples about to be read
    on a small thread pool, so a loader worker decodes while the next samples are in flight instead of
    waiting one request latency per sample."""

    def __init__(self, max_open: int = 64, prefetch_threads: int = PREFETCH_THREADS):
        self._index: dict[str, Index] = {}
        self._files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.max_open = max_open
        self.prefetch_threads = prefetch_threads
        self._pool = None
        self._pending: dict[tuple[str, int], Any] = {}

    def _file(self, path: str):
        handle = self._files.pop(path, None) or open(path, "rb")
        self._files[path] = handle
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)[1].close()
        return handle

    def _members(self, path: str, index: int) -> tuple[str, Members]:
        if path not in self._index:
            try:
                self._index[path] = read_index(path)
            except (OSError, tarfile.TarError) as err:
                self._index[path] = []
                print(f"[data] unreadable shard {path}: {err}", flush=True)
        samples = self._index[path]
        if index >= len(samples):
            raise SkipSample(reasons.MISSING_SAMPLE)
        return samples[index]

    def _fetch(self, path: str, index: int) -> dict:
        """One ranged request from the sample's first member to the end of its last."""
        key, members = self._members(path, index)
        start = min(offset for _, offset, _ in members) if members else 0
        end = max(offset + size for _, offset, size in members) if members else 0
        data = storage.read_bytes(path, start, end) if members else b""
        raw: dict[str, Any] = {"__key__": key, "__url__": path}
        for ext, offset, size in members:
            raw[ext] = data[offset - start:offset - start + size]
        return raw

    def prefetch(self, locations: Iterable[tuple[str, int]]) -> None:
        """Start reading these (shard, index) samples in the background (remote shards only)."""
        if self.prefetch_threads < 1:
            return
        for location in locations:
            if location in self._pending or not storage.is_remote(location[0]):
                continue
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="tar-prefetch")
            self._pending[location] = self._pool.submit(self._fetch, *location)

    def read(self, path: str, index: int) -> dict:
        """The raw sample {'__key__', '__url__', ext: bytes, ...} at `index` of the shard at `path`;
        SkipSample(MISSING_SAMPLE) past the shard's end (or for any sample of an unreadable shard)."""
        future = self._pending.pop((path, index), None)
        if future is not None:
            try:
                return future.result()
            except SkipSample:
                raise
            except Exception:  # a failed background request gets one more, in the foreground
                pass
        if storage.is_remote(path):
            return self._fetch(path, index)
        key, members = self._members(path, index)
        handle = self._file(path)
        raw: dict[str, Any] = {"__key__": key, "__url__": path}
        for ext, offset, size in members:
            handle.seek(offset)
            raw[ext] = handle.read(size)
        return raw
