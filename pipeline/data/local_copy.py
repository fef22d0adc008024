"""A local copy of a remote folder that is read whole, kept between runs: evaluation sets given to
`launch eval --data s3://...`.

Evaluation reads every sample of a set once, through readers that walk folders (classnames.txt,
templates, split folders, shards), and sets are small next to training data; so the set is copied once
to $RESCLIP_CACHE/data_copies/<sha256 of the URL> (default ~/.cache/resclip) and reused while the
bucket's listing (names and sizes) is unchanged. Training data is never copied: it streams by ranged
reads (pipeline.data.stream).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from pathlib import Path

from pipeline import storage

_LISTING = ".listing.json"


def local_copy(url: str) -> Path:
    """The local folder holding every file under `url` (downloaded now if missing or changed)."""
    fs, inner = storage.filesystem(url)
    inner = inner.rstrip("/")
    listing = {posixpath.relpath(path, inner): int(info.get("size") or 0)
               for path, info in fs.find(inner, detail=True).items()}
    if not listing:
        raise ValueError(f"{url}: no such folder, or nothing under it")
    target = storage.cache_root() / "data_copies" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]
    marker = target / _LISTING
    if marker.is_file() and json.loads(marker.read_text()) == listing:
        return target
    print(f"[data] copying {url} ({len(listing)} files, {sum(listing.values()) / 1e6:.1f} MB) to {target}",
          file=sys.stderr, flush=True)  # stdout may be a command's JSON
    marker.unlink(missing_ok=True)
    for relative, size in sorted(listing.items()):
        local = target / relative
        if local.is_file() and local.stat().st_size == size:
            continue  # an interrupted copy resumes
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.partial")
        fs.get_file(posixpath.join(inner, relative), str(partial))
        partial.replace(local)
    marker.write_text(json.dumps(listing))
    return target


def readable_folder(ref: str, key: str) -> Path:
    """A command's folder argument `key` (e.g. '--data') as a local folder: a bucket URL is checked for
    reachability (one line naming `key`) and copied (local_copy); a local path is returned as it is."""
    if not storage.is_remote(ref):
        return Path(ref)
    storage.check_reachable(ref, key)
    return local_copy(ref)
