"""Shard writing shared by every command: one tar per call, written under a temporary name and
renamed into place, so a crash never leaves a truncated tar that looks finished."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

# Fixed member mtime: the same samples always give byte-identical shards (stable sha256).
# An int: tarfile writes a float mtime as an extra PAX header block before every member (webdataset's
# TarWriter does, 1 KiB more per member).
_TAR_MTIME = 1_700_000_000
# Member owner and mode as webdataset's TarWriter writes them.
_TAR_USER = "bigdata"
_TAR_MODE = 0o444
# Temporary names do not end in ".tar", so a `*.tar` glob never picks up a half-written shard.
_PARTIAL_SUFFIX = ".partial"


def shard_name(index: int, padded: bool = True) -> str:
    """`00000.tar` (zero-padded: lexical order equals shard order, like img2dataset) for training
    shards; `0.tar`, `1.tar`, ... (`padded=False`) for eval sets, because CLIP_benchmark's
    webdataset loader opens `{0..N-1}.tar` with N from nshards.txt."""
    return f"{index:05d}.tar" if padded else f"{index}.tar"


@dataclass(frozen=True)
class Sample:
    """One webdataset sample: `key` plus payloads keyed by extension without the dot."""

    key: str
    files: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # webdataset splits a member name at the first dot of its basename.
        assert self.key and "." not in self.key and "/" not in self.key, self.key


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest records about one finished shard."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "num_samples": self.num_samples,
                "num_bytes": self.num_bytes, "sha256": self.sha256}


class _HashingFile:
    """File wrapper hashing bytes as tarfile streams them out, so no second read is needed."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.num_bytes += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardRecord:
    """Write `samples` to the tar `path` atomically and return its record."""
    path = Path(path)
    partial = path.with_name(path.name + _PARTIAL_SUFFIX)
    num_samples = 0
    with open(partial, "wb") as raw:
        hashing = _HashingFile(raw)
        # The stdlib tarfile, laid out like webdataset.TarWriter(encoder=False) (stream mode, members
        # sorted by extension): importing webdataset would import torch, seconds of start-up in
        # every worker process.
        with tarfile.open(fileobj=hashing, mode="w|") as tar:
            for sample in samples:
                for ext in sorted(sample.files):
                    data = sample.files[ext]
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
                    info.uname = info.gname = _TAR_USER
                    tar.addfile(info, io.BytesIO(data))
                num_samples += 1
        raw.flush()
        os.fsync(raw.fileno())
    # The member index first, so a tar under its final name always has one: readers of a bucket fetch
    # samples by ranged requests without scanning headers over the network (pipeline/data/tar_index.py).
    write_index_sidecar(partial, path)
    os.replace(partial, path)
    return ShardRecord(path.name, num_samples, hashing.num_bytes, hashing.hexdigest())


def write_index_sidecar(tar_path: Path, final_path: Path) -> Path:
    """`<stem>.idx.json` beside `final_path`, describing the tar at `tar_path` (its not-yet-renamed self)."""
    from pipeline.data.tar_index import index_local, sidecar_name, to_json

    target = final_path.with_name(sidecar_name(final_path.name))
    write_bytes_atomic(target, to_json(index_local(tar_path), tar_path.stat().st_size).encode("utf-8"))
    return target


def write_shards(out_dir: Path, samples: Iterable[Sample], samples_per_shard: int,
                 first_index: int = 0, padded: bool = True) -> list[ShardRecord]:
    """Cut a sample stream into consecutive shards of `samples_per_shard` (the last may be short),
    named by `shard_name(index, padded)`."""
    assert samples_per_shard > 0
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ShardRecord] = []
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            records.append(write_shard(out_dir / shard_name(first_index + len(records), padded), batch))
            batch = []
    if batch:
        records.append(write_shard(out_dir / shard_name(first_index + len(records), padded), batch))
    return records


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Small metadata files get the same temp-then-rename treatment as shards."""
    partial = path.with_name(path.name + _PARTIAL_SUFFIX)
    partial.write_bytes(data)
    os.replace(partial, path)


def publish_dir(staging: Path, final: Path) -> bool:
    """Rename a fully written staging folder to `final`. Returns False (and removes the staging
    folder) when `final` already exists, e.g. another process finished the same job first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty placeholder is not a finished dataset
    try:
        os.rename(staging, final)
        return True
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
