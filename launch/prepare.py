"""Everything the driver does before a worker starts: sample corpus, absolute paths, preflight, run dir.

Each failure is a ConfigError naming the key and the config file, so nothing is asked of Ray (or a GPU)
for a run that cannot start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from launch.resume import check_resume, keep_earlier_config
from launch.revision import git_revision
from pipeline import storage
from pipeline.config import Config, ConfigError, dump_yaml, zeroshot_entry
from pipeline.data.shards import resolve_shards

REPO = Path(__file__).resolve().parents[1]  # the code whose revision a run records
# Where each data path of a sample corpus sits under the corpus root (data_prep.samples.digits layout).
SAMPLE_LAYOUT = ("labelled/train", "labelled/val", "image_text/train", "image_text/val", "zeroshot")


def ensure_sample_corpus(cfg: Config, source: str) -> None:
    """Write the named sample corpus on first use, at the root its data paths imply."""
    if cfg.data.sample_corpus is None:
        return
    for key in ("train", "val"):
        path = getattr(cfg.data, key)
        if not path or os.path.exists(path):
            continue
        suffix = next((s for s in SAMPLE_LAYOUT if Path(path).as_posix().endswith(s)), None)
        if suffix is None:
            raise ConfigError(f"data.{key}", f"{path} is missing, and a sample corpus path must end with one of "
                              f"{', '.join(SAMPLE_LAYOUT)}", source)
        root = Path(path.removesuffix(suffix).rstrip("/") or ".")
        from data_prep.samples.digits import write_digits_corpus

        print(f"[launch] writing the {cfg.data.sample_corpus} sample corpus to {root}", flush=True)
        write_digits_corpus(root)


def absolute_paths(cfg: Config) -> Config:
    """Ray workers do not run in the user's directory: every relative path becomes absolute here."""
    def absolute(spec: str) -> str:
        parts = [str(Path(p).resolve()) if p and "://" not in p else p for p in spec.split("::")]
        return "::".join(parts)

    data = dataclasses.replace(cfg.data, train=absolute(cfg.data.train), val=absolute(cfg.data.val) if cfg.data.val else "")
    output_dir = cfg.run.output_dir if "://" in cfg.run.output_dir else str(Path(cfg.run.output_dir).resolve())
    run = dataclasses.replace(cfg.run, output_dir=output_dir)
    model = cfg.model
    if model.pretrained_path and "://" not in model.pretrained_path:
        model = dataclasses.replace(model, pretrained_path=str(Path(model.pretrained_path).resolve()))
    zeroshot = tuple(f"{name}={Path(path).resolve()}" for name, path in map(zeroshot_entry, cfg.eval.zeroshot))
    evaluation = dataclasses.replace(cfg.eval, zeroshot=zeroshot)
    distill = cfg.distill
    if distill.teacher and os.path.exists(distill.teacher):
        distill = dataclasses.replace(distill, teacher=str(Path(distill.teacher).resolve()))
    if distill.zeroshot_classes:
        distill = dataclasses.replace(distill, zeroshot_classes=str(Path(distill.zeroshot_classes).resolve()))
    return dataclasses.replace(cfg, data=data, run=run, model=model, eval=evaluation, distill=distill)


def check_async_eval(cfg: Config, source: str) -> None:
    """eval.async: a local run directory, and sets `launch eval` can read (pipeline/evaluation/follow.py)."""
    from pipeline.evaluation.follow import eval_sets

    if storage.is_remote(cfg.run.output_dir):
        # A checkpoint there is complete only once the mirror has uploaded it, and the actor may run on
        # another machine than the staging folder: not supported yet.
        raise ConfigError("eval.async", "needs a local run.output_dir (a run in a bucket: set eval.async false "
                                        "and evaluate its checkpoints with `launch eval` afterwards)", source)
    try:
        eval_sets(cfg)
    except ConfigError as err:
        raise err.with_source(source) from None


def preflight(cfg: Config, source: str) -> None:
    """Shards exist and are enough for the ranks, classes are known, the batch arithmetic works."""
    from pipeline.tasks import task_class
    from pipeline.trainer import make_plan

    task = task_class(cfg, source)  # first: the family's config checks (model.kind, contrastive.loss, ...)
    for key, spec in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        for part in (p.strip() for p in (spec or "").split("::")):
            try:  # a missing bucket, bad credentials or a dead endpoint: one line, in seconds
                storage.check_reachable(part, key)
            except storage.StorageError as err:
                raise ConfigError(key, str(err).removeprefix(f"{key}: "), source) from None
    try:
        shards = resolve_shards(cfg.data.train)
    except ValueError as err:
        raise ConfigError("data.train", str(err), source) from None
    if cfg.data.val:
        try:
            resolve_shards(cfg.data.val)
        except ValueError as err:
            raise ConfigError("data.val", str(err), source) from None
    try:
        notes = task.check(cfg) or []
    except ConfigError as err:
        if err.key == "distill.teacher" and not os.path.exists(cfg.distill.teacher):
            err = ConfigError(err.key, err.message + producing_command(cfg.distill.teacher, source), source)
        raise err.with_source(source) from None
    if cfg.eval.async_:
        check_async_eval(cfg, source)
    try:
        make_plan(cfg, sum(s.num_samples for s in shards), cfg.ray.num_workers)
    except ValueError as err:
        raise ConfigError("data.batch_size_per_rank", str(err).split(": ", 1)[1], source) from None
    # Any number of shards serves any number of readers (each reader seeks to its own samples), so
    # shards < ranks x loader workers needs no refusal; a shard that cannot be decoded does.
    spot_check(shards[0].path, "data.train", source)
    warning = shuffle_warning(cfg)
    if warning:
        print(f"[launch] warning: {warning}", flush=True)
    note = remote_read_note(cfg)
    if note:
        print(f"[launch] note: {note}", flush=True)
    if storage.is_remote(cfg.run.output_dir):
        try:  # a missing bucket, wrong credentials or a dead endpoint: one line, before any worker starts
            storage.check_reachable(cfg.run.output_dir, "run.output_dir", writable=True)
        except storage.StorageError as err:
            raise ConfigError("run.output_dir", str(err).removeprefix("run.output_dir: "), source) from None
        from pipeline.run_mirror import sync_down

        sync_down(cfg)  # staging: the bucket's run record and newest complete checkpoint (the resume checks')
    else:
        output = Path(cfg.run.output_dir)
        try:
            output.mkdir(parents=True, exist_ok=True)
            probe = output / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError("run.output_dir", f"{output} is not writable ({err.strerror})", source) from None
    for note in notes:
        print(f"[launch] {note}", flush=True)
    check_resume(cfg, source)


def producing_command(run_ref: str, source: str) -> str:
    """For a run that does not exist: "; `launch pretrain --config FILE` produces it" when a config beside
    `source` (the user's config file) names that run, else ""."""
    name = Path(run_ref).name
    for path in sorted(Path(source).parent.glob("*.yaml")):
        if f"name: {name}\n" in path.read_text(encoding="utf-8"):
            return f"; `launch pretrain --config {Path(source).parent / path.name}` produces it"
    return ""


def write_run_record(cfg: Config, source: str) -> Path:
    """Resolved config, library versions and git revision: what reproduces this run."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_earlier_config(cfg)
    (run_dir / "config.yaml").write_text(f"# resolved from {source}\n" + dump_yaml(cfg))
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "deepspeed", "ray", "timm", "open_clip_torch", "webdataset", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    (run_dir / "versions.json").write_text(json.dumps({**versions, "git": git_revision(REPO)}, indent=1))
    return run_dir


def spot_check(shard_path: str, key: str, source: str, num_samples: int = 8) -> None:
    """Some of the first samples of a shard must hold a decodable image. One bad sample is the trainer's
    to skip and count; a shard where none of the first few decodes is a wrong dataset or a wrong format."""
    from pipeline.data import reasons
    from pipeline.data.reader import TarSamples, decode_image
    from pipeline.data.reasons import SkipSample

    samples, skipped = TarSamples(), []
    for index in range(num_samples):
        try:
            decode_image(samples.read(shard_path, index))
            return
        except SkipSample as why:
            skipped.append(str(why))
            if str(why) == reasons.MISSING_SAMPLE:
                break
    raise ConfigError(key, f"spot check of {shard_path}: none of its first {len(skipped)} samples decodes "
                      f"(first: {skipped[0]})", source)


# Below this many samples per ranged GET the client's per-request CPU (~2.8 ms against ~0.05 ms for a local
# read, benchmarks/RESULTS.md, issue 14) dominates a remote loader.
REMOTE_BLOCK_HINT = 64


def remote_read_note(cfg: Config) -> str | None:
    """One line when training reads a bucket one sample per request: block reads are the fast way, and the
    block is part of the stream, so the user chooses it (it is never changed behind their back)."""
    remote = [p.strip() for p in cfg.data.train.split("::") if p.strip() and storage.is_remote(p.strip())]
    if not remote or cfg.data.shuffle_block >= REMOTE_BLOCK_HINT:
        return None
    return (f"data.train is in a bucket ({remote[0]}) and data.shuffle_block is {cfg.data.shuffle_block}: about "
            f"{cfg.data.shuffle_block} sample(s) per ranged GET; on shards data-prep shuffled, data.shuffle_block: "
            f"{REMOTE_BLOCK_HINT} reads a block per GET (the loader then ran at 0.8-1x of local disk, "
            f"against 0.1-0.15x one sample per GET: benchmarks/RESULTS.md)")


def shuffle_warning(cfg: Config) -> str | None:
    """One line when the training stream's shuffle cannot mix shards written in class order, unless
    data-prep shuffled the rows of every training source (its manifest records the seed)."""
    from pipeline import families
    from pipeline.data.shards import read_manifest
    from pipeline.data.stream import mixing_shortfall

    manifests = [read_manifest(p)
                 for p in (part.strip() for part in cfg.data.train.split("::")) if p]
    if manifests and all(m and m.get("options", {}).get("shuffle_seed") is not None for m in manifests):
        return None
    num_classes = None
    if families.get(cfg.model.kind).data_kind == "labelled":  # classifiers, and distillation into one
        num_classes = cfg.data.num_classes or ((manifests[0] or {}).get("num_classes") if manifests else None)
    return mixing_shortfall(cfg.data.shuffle_buffer, cfg.data.shuffle_block,
                            cfg.data.batch_size_per_rank * cfg.ray.num_workers, num_classes)
