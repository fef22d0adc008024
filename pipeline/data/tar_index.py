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

import hashlib
import json
import os
import tarfile
import tempfile
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
        if not member.isfile() or os.path.basename(member.name).startswith("__"):
            continue
        key, ext = _split_name(member.name)
        if key is None:
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((ext.lower(), member.offset_data, member.size))
    return samples


def index_local(path: str | Path) -> Index:
    with tarfile.open(path, "r:") as tar:  # 'r:' seeks over member data: headers only
        return index_members(tar)


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
