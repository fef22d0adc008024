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

# Remote block reads (data.shuffle_block > 1): the bytes of fetched runs a loader worker keeps, least recently
# used first out. A window's blocks are spread over the whole window (its shuffle), so a run fetched for its
# first sample waits there for this reader's other samples of it; a run evicted before they are read is
# fetched again (TarSamples.stats["refetches"]). Per loader worker: held + in flight <= this + one run.
BLOCK_CACHE_BYTES = 128 * 2**20
# Longest run read by one GET: a block of more samples is read in aligned pieces of this many.
MAX_RUN_SAMPLES = 128
_EVICTED_REMEMBERED = 4096  # evicted runs remembered to count refetches (bounded: this many keys)


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
    # convert() copies even an RGB image (~0.08 ms for 224 px, 4% of an eval image's CPU): same pixels without.
    return image if image.mode == "RGB" else image.convert("RGB")


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
    (its members are consecutive in the tar), or, when the caller names the run of consecutive samples the
    sample belongs to (`run`: a block of the epoch layout inside one shard), by one ranged request per run,
    whose bytes are kept (LRU, BLOCK_CACHE_BYTES) until this reader's other samples of it are read.
    `prefetch` starts the requests of samples about to be read on a small thread pool, so a loader worker
    decodes while the next samples are in flight instead of waiting one request latency per sample."""

    def __init__(self, max_open: int = 64, prefetch_threads: int = PREFETCH_THREADS, cache_bytes: int | None = None):
        self._index: dict[str, Index] = {}
        self._files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.max_open = max_open
        self.prefetch_threads = prefetch_threads
        self._pool = None
        self._pending: dict[tuple, Any] = {}
        self.cache_bytes = BLOCK_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._runs: collections.OrderedDict[tuple[str, int, int], tuple[int, bytes]] = collections.OrderedDict()
        self._pending_bytes: dict[tuple[str, int, int], int] = {}
        self._evicted: collections.OrderedDict[tuple[str, int, int], None] = collections.OrderedDict()
        self.stats = {"gets": 0, "refetches": 0, "bytes_fetched": 0, "bytes_used": 0, "cached_bytes": 0,
                      "largest_run_bytes": 0}
        """Remote run reads: GETs, GETs of a run read before and evicted, bytes fetched and of samples served."""

    def _file(self, path: str):
        handle = self._files.pop(path, None) or open(path, "rb")
        self._files[path] = handle
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)[1].close()
        return handle

    def _shard_index(self, path: str) -> Index:
        if path not in self._index:
            try:
                self._index[path] = read_index(path)
            except (OSError, tarfile.TarError) as err:
                self._index[path] = []
                print(f"[data] unreadable shard {path}: {err}", flush=True)
        return self._index[path]

    def _members(self, path: str, index: int) -> tuple[str, Members]:
        samples = self._shard_index(path)
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

    @staticmethod
    def _run_key(path: str, index: int, run: tuple[int, int]) -> tuple[str, int, int]:
        """(shard, first, end) of the piece of the run holding `index` that one GET reads."""
        first, end = run
        piece = first + (index - first) // MAX_RUN_SAMPLES * MAX_RUN_SAMPLES
        return path, piece, min(end, piece + MAX_RUN_SAMPLES)

    def _run_range(self, key: tuple[str, int, int]) -> tuple[int, int]:
        """Byte range [start, end) of the tar that holds the members of the run's samples."""
        path, first, end = key
        spans = [(offset, offset + size) for _, members in self._shard_index(path)[first:end]
                 for _, offset, size in members]
        return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)

    def _fetch_run(self, key: tuple[str, int, int], byte_range: tuple[int, int]) -> tuple[int, bytes]:
        start, end = byte_range
        return start, storage.read_bytes(key[0], start, end) if end > start else b""

    def _keep(self, key: tuple[str, int, int], entry: tuple[int, bytes]) -> None:
        """Hold a fetched run, evicting the least recently used ones past the byte cap (never the new one)."""
        self.stats["gets"] += 1
        self.stats["bytes_fetched"] += len(entry[1])
        self.stats["largest_run_bytes"] = max(self.stats["largest_run_bytes"], len(entry[1]))
        if key in self._evicted:
            del self._evicted[key]
            self.stats["refetches"] += 1
        self._runs[key] = entry
        self.stats["cached_bytes"] += len(entry[1])
        self._trim(keep=1)

    def _trim(self, keep: int) -> None:
        while (self.stats["cached_bytes"] + sum(self._pending_bytes.values()) > self.cache_bytes
               and len(self._runs) > keep):
            old, (_, data) = self._runs.popitem(last=False)
            self.stats["cached_bytes"] -= len(data)
            self._evicted[old] = None
            if len(self._evicted) > _EVICTED_REMEMBERED:
                self._evicted.popitem(last=False)

    def _read_run(self, path: str, index: int, key: tuple[str, int, int]) -> dict:
        entry = self._runs.get(key)
        if entry is not None:
            self._runs.move_to_end(key)
        else:
            future = self._pending.pop(key, None)
            self._pending_bytes.pop(key, None)
            try:
                entry = future.result() if future is not None else None
            except Exception:  # a failed background request gets one more, in the foreground
                entry = None
            if entry is None:
                entry = self._fetch_run(key, self._run_range(key))
            self._keep(key, entry)
        name, members = self._members(path, index)
        start, data = entry
        raw: dict[str, Any] = {"__key__": name, "__url__": path}
        for ext, offset, size in members:
            raw[ext] = data[offset - start:offset - start + size]
            self.stats["bytes_used"] += size
        return raw

    def _submit(self, key: tuple, call: Callable, *args) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="tar-prefetch")
        self._pending[key] = self._pool.submit(call, *args)

    def prefetch(self, locations: Iterable[tuple]) -> None:
        """Start reading these samples in the background (remote shards only): (shard, index) reads the
        sample, (shard, index, first, end) the piece of the run [first, end) of the shard holding it. Run
        requests stop while held and in-flight run bytes would pass the cache's cap."""
        if self.prefetch_threads < 1:
            return
        for location in locations:
            if not storage.is_remote(location[0]):
                continue
            if len(location) == 2 or location[3] - location[2] < 2:
                if location[:2] not in self._pending:
                    self._submit(location[:2], self._fetch, *location[:2])
                continue
            key = self._run_key(location[0], location[1], location[2:4])
            if key in self._runs or key in self._pending:
                continue
            byte_range = self._run_range(key)
            self._pending_bytes[key] = byte_range[1] - byte_range[0]
            self._trim(keep=0)
            if len(self._pending_bytes) > 1 and sum(self._pending_bytes.values()) > self.cache_bytes:
                del self._pending_bytes[key]  # read when needed, in the foreground
                continue
            self._submit(key, self._fetch_run, key, byte_range)

    def read(self, path: str, index: int, run: tuple[int, int] | None = None) -> dict:
        """The raw sample {'__key__', '__url__', ext: bytes, ...} at `index` of the shard at `path`;
        SkipSample(MISSING_SAMPLE) past the shard's end (or for any sample of an unreadable shard).
        `run` (first, end): the run of consecutive samples of this shard that `index` belongs to, read
        with one request on object storage (ignored for local shards, which are read in place)."""
        if run is not None and run[1] - run[0] > 1 and storage.is_remote(path):
            return self._read_run(path, index, self._run_key(path, index, run))
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
