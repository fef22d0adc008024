"""Paths are URLs: one small storage layer on fsspec for local paths, s3:// (s3fs), gs:// (gcsfs) and
https:// (read-only).

Endpoint and credentials come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS), so MinIO, Ceph or a test server
work unchanged. Per-bucket overrides: fsspec's own configuration (FSSPEC_S3_* variables or
~/.config/fsspec/*.json), or an AWS profile per bucket through AWS_PROFILE.

Everything else in the code base opens user-supplied locations through these functions, never by
os.path on a string that may be a URL.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
# Variables a worker needs to reach the same buckets as the driver (forwarded to Ray workers).
CREDENTIAL_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                        "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                        "GOOGLE_APPLICATION_CREDENTIALS")


CACHE_VARIABLE = "RESCLIP_CACHE"  # local copies of remote things: staging folders of bucket runs, references


def cache_root() -> Path:
    """Where local copies of remote locations live ($RESCLIP_CACHE, else ~/.cache/resclip)."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "resclip")


def url_digest(url: str) -> str:
    """A short name for a URL's local copy folder (trailing slashes do not count)."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def staging_dir(run_url: str) -> Path:
    """The local folder every process of this machine writes a bucket run's directory in (named like the run);
    pipeline/run_mirror.py mirrors it to the bucket."""
    return cache_root() / "runs" / url_digest(run_url) / posixpath.basename(run_url.rstrip("/"))


class StorageError(ValueError):
    """A location that cannot be reached or read: printed as one line naming the URL."""


def scheme(path: str | Path) -> str:
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(path: str | Path) -> bool:
    return scheme(path) in REMOTE_SCHEMES


def join(base: str | Path, *parts: str) -> str:
    """Join like a path for local locations, like a URL for remote ones (always '/')."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base).joinpath(*parts))


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it)."""
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def credential_env() -> dict[str, str]:
    """The driver's storage variables, for worker processes started elsewhere (Ray runtime_env)."""
    return {name: os.environ[name] for name in CREDENTIAL_VARIABLES if name in os.environ}


def describe(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def exists(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, inner = filesystem(path)
    return fs.exists(inner)


def is_dir(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).is_dir()
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def is_file(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).is_file()
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def listdir(path: str | Path) -> list[str]:
    """Names (not paths) of the entries directly under `path`, sorted."""
    if not is_remote(path):
        return sorted(p.name for p in Path(path).iterdir())
    fs, inner = filesystem(path)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    fs, inner = filesystem(pattern)
    prefix = scheme(pattern) + "://"
    return sorted(prefix + p for p in fs.glob(inner))


def open_file(path: str | Path, mode: str = "rb"):
    if not is_remote(path):
        return open(path, mode)
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def read_bytes(path: str | Path, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes [start, end) of a file: one ranged request on object storage."""
    if not is_remote(path):
        with open(path, "rb") as handle:
            if start:
                handle.seek(start)
            return handle.read() if end is None else handle.read(end - (start or 0))
    fs, inner = filesystem(path)
    return fs.cat_file(inner, start=start, end=end)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def size(path: str | Path) -> int:
    if not is_remote(path):
        return Path(path).stat().st_size
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomic for readers: a local file is renamed into place; an object PUT appears whole or not at all."""
    if not is_remote(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def upload(local_path: str | Path, url: str) -> None:
    """Copy a local file, or a folder recursively, to `url`."""
    fs, inner = filesystem(url)
    local = Path(local_path)
    if local.is_dir():
        for child in sorted(local.rglob("*")):
            if child.is_file():
                fs.put_file(str(child), posixpath.join(inner, child.relative_to(local).as_posix()))
    else:
        fs.put_file(str(local), inner)


def upload_written(files: Iterable[str | Path], local_root: str | Path, url_root: str) -> list[str]:
    """Upload each of `files` (paths under `local_root`) to the same relative place under `url_root`, in order;
    their URLs. For commands that write a folder or file locally first (export, soup) and then publish it."""
    urls = []
    for path in files:
        urls.append(join(url_root, Path(path).relative_to(local_root).as_posix()))
        upload(path, urls[-1])
    return urls


def download(url: str, local_path: str | Path) -> Path:
    """Copy a remote file, or every file under a remote folder, to `local_path`."""
    fs, inner = filesystem(url)
    local = Path(local_path)
    if fs.isdir(inner):
        for remote in fs.find(inner):
            target = local / posixpath.relpath(remote, inner)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(inner, str(local))
    return local


def remove(path: str | Path, recursive: bool = False) -> None:
    if not is_remote(path):
        import shutil

        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target) if recursive else target.rmdir()
        else:
            target.unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=recursive)


def check_reachable(url: str, key: str, writable: bool = False) -> None:
    """Preflight for a remote location: its bucket answers with these credentials (and takes a write).

    Raises StorageError with one line naming the key and the URL; local paths are the caller's business."""
    if not is_remote(url):
        return
    if scheme(url) in ("http", "https") and writable:
        raise StorageError(f"{key}: {url}: http(s) locations are read-only")
    try:
        fs, inner = filesystem(url)
        if scheme(url) == "s3":  # fail in seconds, not after botocore's minutes of retries
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
                "connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 1}})
        bucket = inner.split("/", 1)[0]
        if scheme(url) in ("s3", "gs", "gcs"):
            fs.ls(bucket, detail=False)  # missing bucket, bad credentials and a dead endpoint all fail here
        if writable:
            probe = posixpath.join(inner.rstrip("/"), ".write_probe")
            fs.pipe_file(probe, b"")
            fs.rm(probe)
    except Exception as err:  # botocore/aiohttp/gcsfs raise many types: one line whatever it is
        raise StorageError(f"{key}: cannot reach {url} ({describe(err)}); check the bucket name, "
                           f"AWS_ENDPOINT_URL and the credentials") from None
