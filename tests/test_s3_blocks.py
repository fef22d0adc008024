"""Block reads from a bucket (issue 14, data speed): with data.shuffle_block B > 1 a loader reads each run of
consecutive samples of one shard with one ranged GET, not one GET per sample, and the stream stays the same
sample for sample (exactly once, exact resume). Against a real S3 server (moto, tests/conftest.py)."""
from __future__ import annotations

import io
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.manifest import build_manifest, write_dataset_metadata
from data_prep.writer import Sample, write_shards
from pipeline import storage
from pipeline.data import reader
from pipeline.data.shards import resolve_shards
from pipeline.data.stream import RUN_LOOKAHEAD, Position, ResumableStream

NUM_SHARDS, PER_SHARD, BLOCK = 4, 24, 8
BATCH, WORLD, WINDOW = 4, 2, 32


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("block_shards")
    samples = (Sample(f"s{i:04d}", {"jpg": _jpeg(i), "txt": f"caption {i}".encode()})
               for i in range(NUM_SHARDS * PER_SHARD))
    records = write_shards(folder, samples, PER_SHARD)
    write_dataset_metadata(folder, build_manifest("image_text", records, source={}, options={}), split="train",
                           dataset_name="t")
    return folder


class TarGets:
    """Counts ranged reads of .tar objects (index sidecars and manifests are not sample reads)."""

    def __init__(self, monkeypatch):
        self.urls: list[str] = []
        self._lock = threading.Lock()
        real = storage.read_bytes

        def counting(path, start=None, end=None):
            if str(path).endswith(".tar"):
                with self._lock:
                    self.urls.append(str(path))
            return real(path, start, end)

        monkeypatch.setattr(storage, "read_bytes", counting)


def _stream(shards, rank: int, start: Position = Position()) -> ResumableStream:
    return ResumableStream(shards, rank, WORLD, BATCH, lambda raw: raw["__key__"] + raw["jpg"][-8:].hex(), seed=5,
                           shuffle_window=WINDOW, start=start, collate=list, shuffle_block=BLOCK)


def _keys(shards, rank: int, batches: int, start: Position = Position()) -> list[list[str]]:
    return [item.batch for item in itertools.islice(iter(_stream(shards, rank, start)), batches)]


def _runs_touched(stream: ResumableStream, batches: int) -> set[tuple[str, int]]:
    """(shard, first sample) of every run of a block in one shard that this rank's first micro-batches read."""
    runs = set()
    for layout, first in itertools.islice(stream.micro_batches(), batches):
        begin = first + stream.rank * BATCH
        for position in range(begin, begin + BATCH):
            path, _, run_first, _ = layout.locate_run(position)
            runs.add((path, run_first))
    return runs


def test_blocks_are_read_with_one_get_each(local_shards, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/train"
    storage.upload(local_shards, url)
    remote, local = resolve_shards(url), resolve_shards(str(local_shards))
    epoch_batches = NUM_SHARDS * PER_SHARD // (BATCH * WORLD)  # 12: the epoch is read exactly
    gets = TarGets(monkeypatch)
    by_rank = []
    for rank in range(WORLD):
        before = len(gets.urls)
        by_rank.append(_keys(remote, rank, epoch_batches))
        # Runs of the micro-batches read, and of those the reader requested ahead (RUN_LOOKAHEAD).
        runs = _runs_touched(_stream(remote, rank), epoch_batches + RUN_LOOKAHEAD)
        samples = epoch_batches * BATCH
        # One GET per run of a block, not one per sample (48 samples read here).
        assert len(gets.urls) - before <= len(runs) < samples
    # The same stream as the local shards' (which read by seeking), sample for sample.
    assert by_rank == [_keys(local, rank, epoch_batches) for rank in range(WORLD)]
    # Exactly once: the two ranks together read every sample of the epoch once.
    keys = [key[:5] for batches in by_rank for batch in batches for key in batch]
    assert sorted(keys) == [f"s{i:04d}" for i in range(NUM_SHARDS * PER_SHARD)]
    # Resume from the bucket at the exact next sample, mid-epoch and into the next epoch.
    for rank in range(WORLD):
        full = _keys(remote, rank, epoch_batches + 3)
        assert _keys(remote, rank, 8, start=Position(epoch=0, offset=7 * BATCH * WORLD)) == full[7:15]


def test_a_byte_cap_refetches_and_reads_the_same(local_shards, s3_bucket, tmp_path, monkeypatch):
    """With a block cache too small for a window the reader refetches (counted) and still reads the same samples."""
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/train"
    storage.upload(local_shards, url)
    remote = resolve_shards(url)
    roomy = _keys(remote, 0, 6)
    monkeypatch.setattr(reader, "BLOCK_CACHE_BYTES", 1)  # holds only the block just read
    stores = []
    real_init = reader.TarSamples.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(reader.TarSamples, "__init__", keep)
    assert _keys(remote, 0, 6) == roomy
    assert stores and stores[0].stats["refetches"] > 0
    assert stores[0].stats["cached_bytes"] <= max(stores[0].stats["largest_run_bytes"], 1)


def test_local_shards_are_read_in_place(local_shards, monkeypatch):
    """Local tars keep being read by seeking: no block reads through storage.read_bytes."""
    gets = TarGets(monkeypatch)
    keys = _keys(resolve_shards(str(local_shards)), 0, 3)
    assert len(keys) == 3 and gets.urls == []


def test_evaluation_reads_a_batch_per_get(local_shards, s3_bucket, tmp_path, monkeypatch):
    """EvalStream's batches are consecutive samples: one GET per batch and shard, every sample once, in order."""
    from pipeline.data.stream import EvalStream

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/val"
    storage.upload(local_shards, url)
    remote = resolve_shards(url)
    gets = TarGets(monkeypatch)
    batch = 10  # 96 samples: 10 batches, 3 of them straddle two shards
    keys = [k for item in EvalStream(remote, 0, 1, batch, lambda raw: raw["__key__"], collate=list)
            for k in item.batch]
    assert keys == [f"s{i:04d}" for i in range(NUM_SHARDS * PER_SHARD)]
    assert len(gets.urls) <= 10 + NUM_SHARDS - 1


def test_preflight_notes_one_line_when_a_bucket_is_read_a_sample_per_get():
    from launch.prepare import REMOTE_BLOCK_HINT, remote_read_note
    from pipeline.config import load_config

    def note(**values) -> str | None:
        smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke_clip.yaml")
        return remote_read_note(load_config(smoke, [f"{k}={v}" for k, v in values.items()]))

    line = note(**{"data.train": "s3://bucket/shards"})
    assert line is not None and "\n" not in line and "s3://bucket/shards" in line
    assert f"data.shuffle_block: {REMOTE_BLOCK_HINT}" in line and "data.shuffle_block is 1" in line
    assert note(**{"data.train": "/local/shards"}) is None  # local reads are cheap: nothing to say
    assert note(**{"data.train": "s3://bucket/shards", "data.shuffle_block": REMOTE_BLOCK_HINT}) is None
    assert note(**{"data.train": "/local/a::gs://bucket/b"}) is not None  # any remote source
