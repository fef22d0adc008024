"""A run directory in a bucket (`run.output_dir: s3://...` or `gs://...`): written locally, mirrored up.

Every process reads and writes the run directory in a local staging folder exactly as it does a local run
(`Config.run_dir`, under $RESCLIP_CACHE or ~/.cache/resclip); the bucket (`Config.run_url`) is the run's
durable copy, and the only one a relaunch trusts:

* checkpoints: after the local save, each rank uploads the files it wrote (rank r its `zero_pp_rank_r_*`
  shards; rank 0 also the model states) in a background thread. Rank 0 uploads `meta.json`, the completeness
  mark, only when every file the checkpoint must hold (`checkpoint.expected_files`) is listed in the bucket.
  An object PUT appears whole or not at all, and leftovers of an earlier attempt at the same step are deleted
  before the step is written, so a listed file is this attempt's whole file. Training waits for the uploads
  only when the next checkpoint is due, at the end, and on preemption (`RunMirror.wait`).
* run files: metrics.jsonl, tensorboard/, final_metrics.json and preempted.json go up from rank 0 after each
  checkpoint is marked complete, at most every RUN_FILES_EVERY_S while it logs, and at the end; config.yaml,
  the archived config.step_*.yaml and versions.json from the driver at launch.
* retention: keep_last / keep_every apply in the bucket (meta.json deleted first; incomplete step folders
  older than the newest complete one are upload leftovers and go too). Staging keeps the newest checkpoint.
* resume: the newest checkpoint complete *in the bucket* is downloaded into staging (by the driver for its
  preflight checks, then by local rank 0 of every node) and loaded through the usual weights-only loader;
  staging checkpoints the bucket does not hold complete are dropped. A fresh node starts from the bucket.
References to runs and files in buckets (`launch eval/export/report`, `distill.teacher`,
`model.pretrained_path`) are copied by pipeline/remote_refs.py with the same primitives.
"""
from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from pipeline import checkpoint, storage

FETCH_RECORD = ".fetched.json"  # in a downloaded folder: the remote listing it is a copy of
RUN_FILES = ("metrics.jsonl", "final_metrics.json", "preempted.json")  # rank 0's, mirrored while it runs
RUN_FOLDERS = ("tensorboard",)
RECORD_FILES = ("versions.json",)  # the driver's, with config.yaml and config.step_*.yaml
RUN_FILES_EVERY_S = 60.0
POLL_S = 0.5  # rank 0 looks for the other ranks' uploads this often
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


# -- places -------------------------------------------------------------------------------------------


def _ckpt_url(run_url: str, step: int) -> str:
    return storage.join(run_url, "checkpoints", checkpoint.step_tag(step))


def shown(cfg, local: Path) -> str:
    """Where a file of the run directory lives, for people: its URL in the bucket for a bucket run."""
    if not storage.is_remote(cfg.run.output_dir):
        return str(local)
    return storage.join(cfg.run_url, Path(local).relative_to(cfg.run_dir).as_posix())


# -- listings and copies ---------------------------------------------------------------------------------


def fresh_fs(url: str):
    """(filesystem, path) with fsspec's cached listings dropped: another process may have written since."""
    fs, inner = storage.filesystem(url)
    fs.invalidate_cache()
    return fs, inner


def listing(url: str) -> dict[str, dict]:
    """Every object under `url`: path relative to it -> its info (size, ETag ...); {} when there is none."""
    fs, inner = fresh_fs(url)
    try:
        found = fs.find(inner, detail=True)
    except FileNotFoundError:
        return {}
    inner = inner.rstrip("/")
    return {posixpath.relpath(path, inner): info for path, info in found.items()
            if info.get("type") != "directory" and path.rstrip("/") != inner}


def fresh_exists(url: str) -> bool:
    fs, inner = fresh_fs(url)
    return fs.exists(inner)


def _fingerprint(info: dict) -> list:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or info.get("mtime")
    return [int(info.get("size") or 0), str(tag) if tag else None]


def remote_steps(run_url: str) -> dict[int, dict[str, dict]]:
    """Step -> {file name: info} of every step folder under the run's checkpoints/ in the bucket."""
    steps: dict[int, dict[str, dict]] = {}
    for relative, info in listing(storage.join(run_url, "checkpoints")).items():
        folder, _, name = relative.partition("/")
        match = _STEP_DIR.match(folder)
        if match and name and "/" not in name:
            steps.setdefault(int(match.group(1)), {})[name] = info
    return steps


def complete_steps(steps: dict[int, dict]) -> list[int]:
    return sorted(step for step, files in steps.items() if checkpoint.META_FILE in files)


def fetch_folder(url: str, files: dict[str, dict], local_dir: Path) -> Path:
    """Make `local_dir` a copy of the remote folder `url` (`files`: its listing), meta.json last. A folder that
    already is one (same names, sizes and ETags) is kept. Written beside and renamed into place, so another
    process fetching the same folder (a staging folder on a shared home) never sees half of it."""
    record = {name: _fingerprint(info) for name, info in files.items()}
    if _fetched_record(local_dir) == record and all(tag for _, tag in record.values()):
        return local_dir  # (a server that gives no ETag or date: fetched again each time)
    fs, inner = storage.filesystem(url)
    partial = local_dir.with_name(f".{local_dir.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in sorted(files, key=lambda n: (n == checkpoint.META_FILE, n)):
        target = partial / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(posixpath.join(inner.rstrip("/"), name), str(target))
    (partial / FETCH_RECORD).write_text(json.dumps(record))
    shutil.rmtree(local_dir, ignore_errors=True)
    try:
        os.replace(partial, local_dir)
    except OSError:  # another process put the same copy there first
        shutil.rmtree(partial, ignore_errors=True)
        if _fetched_record(local_dir) != record:
            raise
    return local_dir


def _fetched_record(local_dir: Path) -> dict | None:
    try:
        return json.loads((local_dir / FETCH_RECORD).read_text())
    except (OSError, ValueError):
        return None


def fetch_latest(run_url: str, run_dir: Path) -> Path | None:
    """Staging holds the bucket's newest complete checkpoint, and no other (the bucket is what a relaunch
    trusts: a staging checkpoint that never finished uploading would be a different resume point on
    another node). Returns it, or None when the bucket has none."""
    steps = remote_steps(run_url)
    complete = complete_steps(steps)
    root = checkpoint.checkpoints_root(run_dir)
    keep = checkpoint.step_tag(complete[-1]) if complete else None
    if root.is_dir():
        for child in root.iterdir():
            if child.name != keep and (_STEP_DIR.match(child.name) or child.name.startswith(".step_")):
                shutil.rmtree(child, ignore_errors=True)
    if keep is None:
        return None
    return fetch_folder(_ckpt_url(run_url, complete[-1]), steps[complete[-1]], root / keep)


# -- the driver ---------------------------------------------------------------------------------------------


def sync_down(cfg) -> Path | None:
    """Driver, before the resume checks: staging gets the bucket's run record (metrics.jsonl, configs ...) and,
    when the run resumes, its newest complete checkpoint (downloaded once here, reused by workers on this
    machine). Files of the run record the bucket lacks are dropped from staging."""
    run_dir, url = cfg.run_dir, cfg.run_url
    run_dir.mkdir(parents=True, exist_ok=True)
    top = {name: info for name, info in listing(url).items() if "/" not in name}
    for name in RUN_FILES:
        if name not in top:
            (run_dir / name).unlink(missing_ok=True)
    wanted = {name: info for name, info in top.items()
              if name in RUN_FILES or name in RECORD_FILES or re.fullmatch(r"config(\.step_\d{8})?\.yaml", name)}
    fs, inner = storage.filesystem(url)
    for name in wanted:
        fs.get_file(posixpath.join(inner.rstrip("/"), name), str(run_dir / name))
    return fetch_latest(url, run_dir) if cfg.checkpoint.resume else None


def upload_run_record(cfg) -> None:
    """Driver, after writing the run record: config.yaml, archived configs and versions.json to the bucket."""
    run_dir = cfg.run_dir
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and (path.name in RECORD_FILES or re.fullmatch(r"config(\.step_\d{8})?\.yaml", path.name)):
            storage.upload(path, storage.join(cfg.run_url, path.name))


def read_run_json(cfg, name: str) -> dict | None:
    """A JSON file of the run directory (final_metrics.json, preempted.json): from the bucket for a bucket run,
    where rank 0 put it before returning (the driver's machine may not be rank 0's)."""
    if storage.is_remote(cfg.run.output_dir):
        url = storage.join(cfg.run_url, name)
        return json.loads(storage.read_text(url)) if fresh_exists(url) else None
    path = cfg.run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def write_run_file(cfg, name: str, text: str) -> None:
    """A small file of the run directory written in staging and, for a bucket run, in the bucket at once (the
    fault drill's once-per-run marker: a restarted rank may come back on another machine)."""
    (cfg.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / name).write_text(text)
    if storage.is_remote(cfg.run.output_dir):
        storage.write_text(storage.join(cfg.run_url, name), text)


def run_file_exists(cfg, name: str) -> bool:
    if storage.is_remote(cfg.run.output_dir):
        return fresh_exists(storage.join(cfg.run_url, name))
    return (cfg.run_dir / name).exists()


def remove_run_file(cfg, name: str) -> None:
    if storage.is_remote(cfg.run.output_dir):
        fs, inner = fresh_fs(storage.join(cfg.run_url, name))
        if fs.exists(inner):
            fs.rm(inner)


def apply_remote_retention(run_url: str, keep_last: int, keep_every: int) -> list[int]:
    """keep_last / keep_every in the bucket, as checkpoint.apply_retention does locally; returns deleted steps."""
    steps = remote_steps(run_url)
    complete = complete_steps(steps)
    if not complete:
        return []
    keep = checkpoint.retained_steps(complete, keep_last, keep_every)
    # Incomplete folders older than the newest complete one are uploads a killed run left behind.
    doomed = [s for s in sorted(steps) if s not in keep and (s in complete or s < complete[-1])]
    for step in doomed:
        _remove_checkpoint(_ckpt_url(run_url, step))
    return doomed


def _remove_checkpoint(url: str) -> None:
    """The completeness mark goes first: a deletion cut short never leaves a "complete" folder with holes."""
    fs, inner = fresh_fs(url)
    meta = posixpath.join(inner, checkpoint.META_FILE)
    if fs.exists(meta):
        fs.rm(meta)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


# -- the workers ------------------------------------------------------------------------------------------


class _Job:
    """A daemon thread whose exception is kept for join()."""

    def __init__(self, target: Callable, *args, stop: threading.Event | None = None):
        self.error: BaseException | None = None
        self.stop = stop or threading.Event()

        def body() -> None:
            try:
                target(*args)
            except BaseException as err:  # noqa: BLE001 - reported by join() in the training thread
                self.error = err

        self.thread = threading.Thread(target=body, daemon=True, name="run-mirror")
        self.thread.start()

    def join(self) -> BaseException | None:
        self.thread.join()
        return self.error


class RunMirror:
    """A rank's side of a bucket run: uploads its checkpoint files, and (rank 0) marks checkpoints complete,
    applies retention and mirrors the run files. Every method is a no-op for a local run."""

    def __init__(self, cfg, rank: int, world_size: int, local_rank: int):
        self.cfg, self.rank, self.world_size, self.local_rank = cfg, rank, world_size, local_rank
        self.enabled = storage.is_remote(cfg.run.output_dir)
        self.url, self.run_dir = cfg.run_url, cfg.run_dir
        self._upload: _Job | None = None
        self._commit: _Job | None = None
        self._files_job: _Job | None = None
        self._files_lock = threading.Lock()
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._files_synced_at = time.monotonic()
        self._group = None
        if self.enabled and world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_backend() != "gloo":  # the flags travel on a CPU group
                self._group = dist.new_group(backend="gloo")

    # -- resume

    def resume_point(self) -> Path | None:
        """Collective. The checkpoint to resume from, in this machine's staging folder."""
        if self.enabled:
            error = None
            # Every rank makes sure its machine's staging holds the checkpoint, one at a time per machine (a
            # file lock): local ranks cannot tell machines apart when several share an IP address (Ray sees
            # one node), and a second fetcher finds the first one's copy and downloads nothing.
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(self.run_dir / ".fetch.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    fetch_latest(self.url, self.run_dir)
            except Exception as err:  # noqa: BLE001 - every rank raises together below
                error = err
            self._raise_unless_all_ok(error, f"cannot download the latest checkpoint of {self.url}")
            if self.rank == 0:
                self._fetch_run_files()
        return checkpoint.find_latest_complete(self.run_dir)

    def _fetch_run_files(self) -> None:
        """metrics.jsonl continues the bucket's copy (rank 0 may run on a machine the run never used)."""
        for name in ("metrics.jsonl",):
            url, local = storage.join(self.url, name), self.run_dir / name
            if fresh_exists(url):
                storage.download(url, local)
            else:
                local.unlink(missing_ok=True)

    # -- checkpoints

    def before_save(self, step: int) -> None:
        """Collective, before checkpoint.save: the previous checkpoint is complete in the bucket, and the
        folder of this step holds no leftovers of an earlier attempt."""
        if not self.enabled:
            return
        self.wait()
        if self.rank == 0:
            _remove_checkpoint(_ckpt_url(self.url, step))
        if self.local_rank == 0:
            self._prune_staging()

    def after_save(self, ckpt_dir: Path, meta: dict) -> None:
        """Start this rank's uploads of the checkpoint just written (and, rank 0, its completion)."""
        if not self.enabled:
            return
        url = storage.join(self.url, "checkpoints", ckpt_dir.name)
        own = sorted(p.name for p in ckpt_dir.iterdir() if p.is_file() and self._owns(p.name))
        self._upload = upload = _Job(self._upload_files, ckpt_dir, url, own)
        if self.rank == 0:
            stop = threading.Event()  # set by wait() once every rank's uploads have returned
            self._commit = _Job(self._mark_complete, ckpt_dir, url, checkpoint.expected_files(meta), upload, stop,
                                stop=stop)

    def _owns(self, name: str) -> bool:
        if name in (checkpoint.META_FILE, FETCH_RECORD) or name.startswith("."):
            return False
        match = _RANK_FILE.search(name)
        return int(match.group(1)) == self.rank if match else self.rank == 0

    @staticmethod
    def _upload_files(ckpt_dir: Path, url: str, names: list[str]) -> None:
        for name in names:
            storage.upload(ckpt_dir / name, storage.join(url, name))

    def _mark_complete(self, ckpt_dir: Path, url: str, expected: list[str], upload: _Job,
                       stop: threading.Event) -> None:
        """Rank 0's thread: meta.json goes up once every expected file is listed in the bucket."""
        if upload.join() is not None:
            return  # wait() reports this rank's own failure
        while True:
            final = stop.is_set()  # a listing taken after every rank's uploads returned is the last word
            files = listing(url)
            missing = [name for name in expected if name not in files]
            if not missing:
                break
            if final:
                raise storage.StorageError(f"{url}: {missing[0]} never reached the bucket")
            stop.wait(POLL_S)
        storage.upload(ckpt_dir / checkpoint.META_FILE, storage.join(url, checkpoint.META_FILE))
        self._record_fetched(ckpt_dir, url)
        apply_remote_retention(self.url, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        self.sync_run_files()

    @staticmethod
    def _record_fetched(ckpt_dir: Path, url: str) -> None:
        """When staging holds every file just uploaded, mark it a copy: a relaunch here downloads nothing."""
        files = listing(url)
        if all((ckpt_dir / name).is_file() and (ckpt_dir / name).stat().st_size == int(info.get("size") or 0)
               for name, info in files.items()):
            (ckpt_dir / FETCH_RECORD).write_text(json.dumps({n: _fingerprint(i) for n, i in files.items()}))

    def wait(self) -> None:
        """Collective: this rank's uploads are done and (rank 0) the checkpoint is marked complete in the
        bucket; a failed upload anywhere raises on every rank."""
        if not self.enabled:
            return
        error = self._upload.join() if self._upload is not None else None
        self._raise_unless_all_ok(error, f"checkpoint upload to {self.url} failed")
        error = None
        if self._commit is not None:
            self._commit.stop.set()
            error = self._commit.join()
        self._upload = self._commit = None
        self._raise_unless_all_ok(error, f"marking the checkpoint complete in {self.url} failed")

    def _prune_staging(self) -> None:
        """Staging keeps the newest complete checkpoint only: the bucket holds every other one kept."""
        root = checkpoint.checkpoints_root(self.run_dir)
        if not root.is_dir():
            return
        newest = checkpoint.find_latest_complete(self.run_dir)
        for child in root.iterdir():
            if child.is_dir() and _STEP_DIR.match(child.name) and child != newest:
                shutil.rmtree(child, ignore_errors=True)

    # -- run files

    def sync_run_files(self) -> None:
        """Rank 0: metrics.jsonl, tensorboard/ and the final / preemption records, each file only when changed."""
        if not self.enabled or self.rank != 0:
            return
        with self._files_lock:
            paths = [self.run_dir / name for name in RUN_FILES]
            for folder in RUN_FOLDERS:
                if (self.run_dir / folder).is_dir():
                    paths += sorted(p for p in (self.run_dir / folder).rglob("*") if p.is_file())
            for path in paths:
                if not path.is_file():
                    continue
                stat = path.stat()
                key = str(path)
                if self._uploaded.get(key) != (stat.st_size, stat.st_mtime_ns):
                    storage.upload(path, storage.join(self.url, path.relative_to(self.run_dir).as_posix()))
                    self._uploaded[key] = (stat.st_size, stat.st_mtime_ns)
            self._files_synced_at = time.monotonic()

    def maybe_sync_run_files(self) -> None:
        """Rank 0 after logging: a background upload of the run files when the last one is old enough."""
        if not self.enabled or self.rank != 0 or time.monotonic() - self._files_synced_at < RUN_FILES_EVERY_S:
            return
        if self._files_job is None or not self._files_job.thread.is_alive():
            self._files_synced_at = time.monotonic()
            self._files_job = _Job(self.sync_run_files)

    def finish(self) -> None:
        """Collective, at the end (or preemption), after the metrics logger closed: the last checkpoint is
        complete in the bucket and every run file is there."""
        if not self.enabled:
            return
        self.wait()
        if self.rank == 0:
            if self._files_job is not None:
                self._files_job.join()
            self.sync_run_files()

    def _raise_unless_all_ok(self, error: BaseException | None, what: str) -> None:
        ok = error is None
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_initialized():
                flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
                ok = bool(flag.item())
        if error is not None:
            raise storage.StorageError(f"{what}: {storage.describe(error)}") from None
        if not ok:
            raise storage.StorageError(f"{what} on another rank (its log says why)")


