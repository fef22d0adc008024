"""Walking a whole shard in order through the project's own reader (pipeline.data.reader), for tests that
rewrite or inspect shards sample by sample."""
from __future__ import annotations

from pipeline.data.reader import TarSamples
from pipeline.data.tar_index import read_index


def shard_samples(path: str) -> list[dict]:
    """Every raw sample ({'__key__', '__url__', ext: bytes, ...}) of the shard at `path`, in shard order."""
    store = TarSamples()
    return [store.read(str(path), index) for index in range(len(read_index(str(path))))]
