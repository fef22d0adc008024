"""`--output s3://bucket/prefix` (or gs://): the job writes into a local staging folder that stands in for
the bucket, and every finished shard is uploaded under its final name as soon as it is done.

Order keeps the bucket as atomic as a local output folder: per shard the tar, then its index sidecar,
then its stats file (the stats file is what marks a partition done, so a tar without one is redone); the
dataset's sizes.json, _info.json and other small files when the job ends, and every manifest.json last.
A rerun after a kill, on this machine or any other, first copies the bucket's small files (the job
identity and the stats files, not the tars) into the staging folder, so the job skips every partition
the bucket already holds; --retry-failed also copies the tars (all of them: it keeps their good rows).
Staging: $RESCLIP_CACHE/data_prep_staging/<sha256 of the URL>; uploaded tars are removed from it.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

from data_prep.partition import STATS_SUFFIX
from pipeline import storage

_BULKY = (".tar", ".idx.json")


@dataclass(frozen=True)
class BucketOutput:
    url: str
    staging: str

    @classmethod
    def for_url(cls, url: str) -> "BucketOutput":
        digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]
        return cls(url.rstrip("/"), str(storage.cache_root() / "data_prep_staging" / digest))

    def remote(self, local: Path | str) -> str:
        relative = Path(local).resolve().relative_to(Path(self.staging).resolve())
        return storage.join(self.url, *relative.parts) if relative.parts else self.url

    def pull(self, with_tars: bool = False) -> None:
        """The bucket's small files (job identity, stats, metadata) into staging; tars only if asked."""
        Path(self.staging).mkdir(parents=True, exist_ok=True)
        fs, inner = storage.filesystem(self.url)
        if not fs.exists(inner):
            return
        for remote in fs.find(inner):
            relative = posixpath.relpath(remote, inner)
            if relative.endswith(_BULKY) and not with_tars:
                continue
            target = Path(self.staging) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))

    def push_shard(self, out_dir: Path, shard_name: str) -> None:
        """One finished partition: tar, index sidecar, then the stats file that marks it done."""
        from pipeline.data.tar_index import sidecar_name

        stem = shard_name[: -len(".tar")]
        tar, sidecar = out_dir / shard_name, out_dir / sidecar_name(shard_name)
        for path in (tar, sidecar):
            if path.is_file():
                storage.upload(path, self.remote(path))
        stats = out_dir / (stem + STATS_SUFFIX)
        if stats.is_file():
            storage.upload(stats, self.remote(stats))
        tar.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)

    def push_rest(self) -> None:
        """Every small file still only in staging, each folder's manifest.json last of all."""
        files = [p for p in sorted(Path(self.staging).rglob("*"))
                 if p.is_file() and not p.name.endswith(".partial") and not p.name.startswith(".")]
        for path in sorted(files, key=lambda p: p.name == "manifest.json"):
            storage.upload(path, self.remote(path))
            if path.name.endswith(_BULKY):  # a shard written outside run_job (none today)
                path.unlink()
