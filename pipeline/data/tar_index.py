"""Member offsets of a tar shard, so samples are read by ranged requests and never by scanning headers.

An index is [(key, [(ext, data offset, size), ...]), ...] in shard order, grouped as webdataset groups
members. Where it comes from:

- a local shard: its headers, read by seeking over member data (cheap on a local disk);
- a remote shard written by data-prep: the sidecar `<stem>.idx.json` beside it (data-prep writes one per
  shard, before the tar appears under its final name). A sidecar, not the manifest: a manifest that held
  every member of a LAION-size set would be hundreds of MB read by every loader worker, while a sidecar
  is one small GET per shard, only by the workers that read it;
- a remote shard with no sidecar (img2dataset or another tool's output): one sequential download of the
  shard, parsing the headers as they stream by, then cached locally under
  $RESCLIP_CACHE/tar_index/<sha256 of url and size>.json (default ~/.cache/resclip), so each machine pays
  that once per shard. Locally rather than beside the shard: training may only have read access to the
  bucket. A shard rewritten with another size gets a new cache entry.

Every remote index records the tar's size, checked against the object's size before use.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import IO

from pipeline import storage

INDEX_FORMAT = "resclip-tar-index/1"
INDEX_SUFFIX = ".idx.json"

Members = list[tuple[str, int, int]]
Index = list[tuple[str, Members]]


def sidecar_name(shard_name: str) -> str:
    """`00000.tar` -> `00000.idx.json` (not matched by `*.tar` globs)."""
    stem = shard_name[:-4] if shard_name.endswith(".tar") else shard_name
    return stem + INDEX_SUFFIX


def sidecar_path(shard_path: str) -> str:
    folder, _, name = str(shard_path).rpartition("/")
    return f"{folder}/{sidecar_name(name)}" if folder else sidecar_name(name)


def _split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's base_plus_ext (key = path up to the first dot of the basename), without importing
    webdataset (it imports torch: seconds in every data-prep worker)."""
    folder, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return os.path.join(folder, stem), ext


def index_members(tar: tarfile.TarFile) -> Index:
    samples: Index = []
    for member in tar:
        if member.isfile():
            _add_member(samples, member.name, member.offset_data, member.size)
    return samples


def _add_member(samples: Index, name: str, data_offset: int, size: int) -> None:
    """A regular file's member into its sample (webdataset's grouping: consecutive members of one key)."""
    if os.path.basename(name).startswith("__"):
        return
    key, ext = _split_name(name)
    if key is None:
        return
    if not samples or samples[-1][0] != key:
        samples.append((key, []))
    samples[-1][1].append((ext.lower(), data_offset, size))


# Indexes of local shards this process has read, by file version: counting an eval set in the main process
# indexes every shard, and its forked loader workers would otherwise scan each header again (~0.17 CPU s per
# worker for 6,000 samples in 8 shards). Bounded by samples, oldest out first: ~0.5 KB per sample in memory.
_LOCAL_INDEXES: collections.OrderedDict[tuple, Index] = collections.OrderedDict()
_LOCAL_INDEX_MAX_SAMPLES = 200_000
_local_index_samples = 0  # the samples in _LOCAL_INDEXES


def index_local(path: str | Path) -> Index:
    """The index of a local shard, kept for the unchanged file (same size, mtime, ctime and inode)."""
    global _local_index_samples
    stat = os.stat(path)
    version = (os.fspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
    index = _LOCAL_INDEXES.get(version)
    if index is None:
        index = _LOCAL_INDEXES[version] = _index_local_file(path)
        _local_index_samples += len(index)
        while _local_index_samples > _LOCAL_INDEX_MAX_SAMPLES:
            _local_index_samples -= len(_LOCAL_INDEXES.popitem(last=False)[1])
    return index


def _index_local_file(path: str | Path) -> Index:
    """Headers only, seeking over member data. Plain ustar/GNU headers (what webdataset, data-prep and
    img2dataset write) are parsed here; anything else (long names, pax records, links, sparse files, a bad
    checksum) is left to tarfile, which gives the same index more slowly (~25 us per member in tarfile's
    header objects against ~3 us here: 12% of an eval worker's CPU on foreign 224 px shards)."""
    index = _scan_plain_headers(path)
    if index is not None:
        return index
    with tarfile.open(path, "r:") as tar:  # 'r:' seeks over member data: headers only
        return index_members(tar)


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (b"7": contiguous), as tarfile's isfile() counts them
_SKIPPED_TYPES = (b"5",)  # directories: no data, not samples
_PAX_TYPE = b"x"  # a pax record for the next header
_SCANNED_TYPES = _FILE_TYPES + _SKIPPED_TYPES + (_PAX_TYPE,)


def _byte_sum(piece: bytes) -> int:
    """sum(piece) for up to 256 bytes, in C: the low half of an Adler-32 started at 0 is the byte sum modulo
    65521, and 256 bytes sum to at most 65280 (sum() over a header's 504 bytes was a third of the scan)."""
    return zlib.adler32(piece, 0) & 0xFFFF


def _next_header(data_offset: int, size: int) -> int:
    """Where the header after a member of `size` bytes starting at `data_offset` begins (512-byte blocks)."""
    return data_offset + -(-size // _BLOCK) * _BLOCK


def _pax_overrides(record: bytes) -> dict[str, str] | None:
    """A pax extended header's path and size ("LEN key=value\\n" records), or None when it holds a key that
    changes more than those (sparse files, a binary charset: tarfile's job)."""
    overrides: dict[str, str] = {}
    position = 0
    while position < len(record) and record[position] != 0:
        length_text, _, _ = record[position:position + 20].partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            return None
        key, equals, value = record[position + len(length_text) + 1:position + length - 1].partition(b"=")
        if not equals or length <= 0 or key.startswith(b"GNU.sparse") or key == b"hdrcharset":
            return None
        if key in (b"path", b"size"):
            overrides[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return overrides


def _scan_plain_headers(path: str | Path) -> Index | None:
    """index_members' result from the raw headers, or None where a header needs tarfile's handling."""
    samples: Index = []
    pax: dict[str, str] | None = None  # the pax record's path and size for the next member, once read
    with open(path, "rb") as handle:
        offset = 0
        while True:
            handle.seek(offset)
            header = handle.read(_BLOCK)
            if len(header) < _BLOCK:
                return None  # an empty or cut file, or no end-of-archive blocks: tarfile says which
            if header.count(0) == _BLOCK:
                return samples if pax is None else None  # the end-of-archive block
            kind = header[156:157]
            size_field = header[124:136]
            if kind not in _SCANNED_TYPES or size_field[0] & 0x80:
                return None  # GNU long-name records, global pax records, links, base-256 sizes: tarfile's job
            # The checksum counts its own field as spaces (POSIX); tarfile checks it, and so must we.
            try:
                stored = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
                size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                return None
            if stored != _byte_sum(header[:148]) + 256 + _byte_sum(header[156:412]) + _byte_sum(header[412:]):
                return None
            data_offset = offset + _BLOCK
            if kind == _PAX_TYPE:  # webdataset's members carry one (a float mtime): path and size may change
                if pax is not None:
                    return None
                handle.seek(data_offset)
                pax = _pax_overrides(handle.read(size))
                if pax is None:
                    return None
                offset = _next_header(data_offset, size)
                continue
            name = header[:100].split(b"\0", 1)[0]
            if header[345] != 0:  # a ustar name prefix (tarfile joins it for any header magic)
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            text = name.decode("utf-8", "surrogateescape")
            if pax is not None:
                text = pax.get("path", text)
                try:
                    size = int(pax.get("size", size))
                except ValueError:
                    return None
                pax = None
            offset = _next_header(data_offset, size)
            if kind in _SKIPPED_TYPES or (kind == b"\0" and text.endswith("/")):  # V7 directories too
                continue
            _add_member(samples, text, data_offset, size)


def index_stream(handle: IO[bytes]) -> Index:
    """The index of a tar read once from start to end (a remote object's sequential download)."""
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        return index_members(tar)


def to_json(index: Index, tar_bytes: int) -> str:
    return json.dumps({"format": INDEX_FORMAT, "tar_bytes": tar_bytes,
                       "samples": [[key, [list(m) for m in members]] for key, members in index]},
                      separators=(",", ":"))


def from_json(text: str, tar_bytes: int | None = None) -> Index | None:
    """The index in `text`, or None when it is not one or was made for a tar of another size."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("format") != INDEX_FORMAT:
        return None
    if tar_bytes is not None and value.get("tar_bytes") != tar_bytes:
        return None
    return [(key, [(ext, int(offset), int(size)) for ext, offset, size in members])
            for key, members in value["samples"]]


def cache_file(url: str, tar_bytes: int) -> Path:
    digest = hashlib.sha256(f"{url}\n{tar_bytes}".encode()).hexdigest()
    return storage.cache_root() / "tar_index" / f"{digest}.json"


def index_remote(url: str) -> Index:
    """A remote shard's index: local cache, else its sidecar, else one sequential read (then cached)."""
    tar_bytes = storage.size(url)
    cached = cache_file(url, tar_bytes)
    if cached.is_file():
        index = from_json(cached.read_text(), tar_bytes)
        if index is not None:
            return index
    index = None
    sidecar = sidecar_path(url)
    try:
        index = from_json(storage.read_text(sidecar), tar_bytes)
    except FileNotFoundError:
        pass
    if index is None:
        with storage.open_file(url) as handle:
            index = index_stream(handle)
    _write_cache(cached, to_json(index, tar_bytes))
    return index


def _write_cache(target: Path, text: str) -> None:
    """Loader workers of several ranks may build the same entry: each writes its own temp file and renames."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".partial")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(partial, target)
    except OSError as err:  # a read-only home costs a rebuild next time, not the run
        print(f"[data] cannot cache the tar index at {target}: {err.strerror}", flush=True)


def read_index(path: str) -> Index:
    return index_remote(path) if storage.is_remote(path) else index_local(path)
