"""Shard writing shared by every command: one tar per call, written under a temporary name and
renamed into place, so a crash never leaves a truncated tar that looks finished."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

Index = list[tuple[str, list[tuple[str, int, int]]]]
"""A shard's member index, as pipeline/data/tar_index.py's Index (not imported here: see write_index_sidecar)."""

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
    """File wrapper hashing bytes as they are written, so no second read is needed."""

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


_BLOCK_BYTES = tarfile.BLOCKSIZE
_RECORD_BYTES = tarfile.RECORDSIZE
_NAME_BYTES = 100  # ustar's name field; longer (or non-ASCII) names need a PAX header block
_SIZE_FIELD = slice(124, 136)
_CHKSUM_FIELD = slice(148, 156)


def _tarfile_header(name: str, size: int) -> bytes:
    """The header block(s) that TarFile.addfile writes for a member of ours (PAX format, the default)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, _TAR_MODE
    info.uname = info.gname = _TAR_USER
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


# The header of a nameless empty member, built by tarfile itself; every plain member's header is this
# block with the name and size written in and the checksum redone. tarfile builds each header in ~20
# Python calls (~0.1 ms per member, 3 members per sample): a fifth of a shard's writing (RESULTS.md, issue 16).
_TEMPLATE = _tarfile_header("", 0)
assert len(_TEMPLATE) == _BLOCK_BYTES
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_CHKSUM_FIELD]) + 8 * ord(" ") - sum(_TEMPLATE[_SIZE_FIELD])


def _member_header(name: str, size: int) -> bytes:
    """Byte for byte `_tarfile_header(name, size)`: tarfile itself for names that need a PAX block."""
    encoded = name.encode("ascii") if name.isascii() else None
    if encoded is None or len(encoded) > _NAME_BYTES or not 0 <= size < 8 ** 11:
        return _tarfile_header(name, size)
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)  # the checksum field counts as spaces
    return b"".join((encoded, _TEMPLATE[len(encoded):124], size_field, _TEMPLATE[136:148],
                     b"%06o\0 " % checksum, _TEMPLATE[156:]))


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardRecord:
    """Write `samples` to the tar `path` atomically and return its record."""
    path = Path(path)
    partial = path.with_name(path.name + _PARTIAL_SUFFIX)
    num_samples = 0
    index: Index = []
    offset = 0
    with open(partial, "wb") as raw:
        hashing = _HashingFile(raw)
        # Laid out as tarfile's stream mode writes it, like webdataset.TarWriter(encoder=False) (members
        # sorted by extension; importing webdataset would import torch, seconds in every worker process),
        # but with headers from a template and the member index kept as the members are written (the
        # index used to be read back from the finished tar).
        for sample in samples:
            for ext in sorted(sample.files):
                data = sample.files[ext]
                name = f"{sample.key}.{ext}"
                header = _member_header(name, len(data))
                padding = -len(data) % _BLOCK_BYTES
                hashing.write(header + data + b"\0" * padding if padding else header + data)
                _add_to_index(index, name, offset + len(header), len(data))
                offset += len(header) + len(data) + padding
            num_samples += 1
        end = offset + 2 * _BLOCK_BYTES  # two zero blocks end the archive, padded to a whole record
        hashing.write(b"\0" * (2 * _BLOCK_BYTES + -end % _RECORD_BYTES))
        raw.flush()
        os.fsync(raw.fileno())
    # The member index first, so a tar under its final name always has one: readers of a bucket fetch
    # samples by ranged requests without scanning headers over the network (pipeline/data/tar_index.py).
    write_index_sidecar(partial, path, index)
    os.replace(partial, path)
    return ShardRecord(path.name, num_samples, hashing.num_bytes, hashing.hexdigest())


def _add_to_index(index: Index, name: str, offset_data: int, size: int) -> None:
    """What tar_index.index_members reads back for this member (a Sample key holds no dot or slash)."""
    if name.startswith("__"):
        return
    key, ext = name.split(".", 1)
    if not index or index[-1][0] != key:
        index.append((key, []))
    index[-1][1].append((ext.lower(), offset_data, size))


def write_index_sidecar(tar_path: Path, final_path: Path, index: Index | None = None) -> Path:
    """`<stem>.idx.json` beside `final_path`, describing the tar at `tar_path` (its not-yet-renamed self);
    `index`: the tar's member index when the writer kept it, else it is read from the tar."""
    from pipeline.data.tar_index import index_local, sidecar_name, to_json

    target = final_path.with_name(sidecar_name(final_path.name))
    index = index_local(tar_path) if index is None else index
    write_bytes_atomic(target, to_json(index, tar_path.stat().st_size).encode("utf-8"))
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
