"""Sequential reading of webdataset tars, and the skip signal every decoder raises.

Training and evaluation read through pipeline.data.stream (random access, exactly once); this
sequential reader serves tools that walk whole shards in order.
"""
from __future__ import annotations

from typing import Callable, Iterator

from webdataset.tariterators import group_by_keys, tar_file_expander


class SkipSample(Exception):
    """Raised by a decode function for a sample that must be skipped; the message is the reason."""


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
