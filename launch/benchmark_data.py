"""`launch benchmark-data`: the training loader of a config alone (no model, no Ray), in samples/s.

    launch benchmark-data --config configs/smoke_clip.yaml
    launch benchmark-data --config configs/smoke_clip.yaml --data /data/laion-shards --image-size 224 \\
        --batch-size 64 --workers 2 --steps 50

Tells a user whether the data path keeps the accelerators fed before paying for them: compare the last
line's samples/s with the step rate the model reaches. `--data` takes any folder of labelled (jpg/cls) or
image-text (jpg/txt or jpg/json caption) shards, ours or another tool's (img2dataset, open_clip, timm).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tarfile
import time
from pathlib import Path
from typing import Iterable

import torch

from pipeline import families, storage
from pipeline.config import Config, load_config
from pipeline.data.fast_image import fast_path_supported
from pipeline.data.reader import IMAGE_EXTENSIONS
from pipeline.data.shards import Shard, read_manifest, resolve_shards, unreadable_shard

LOADER_KINDS = ("labelled", "image_text")
DECODES = ("auto", "fast", "plain")
DEFAULT_TOKENIZER = "ViT-B-32"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("benchmark-data", help="measure the training loader alone (samples/s, per core)")
    parser.add_argument("--config", required=True, help="YAML config whose data section is measured")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--data", default=None, help="folder of shards to read instead of data.train")
    parser.add_argument("--image-size", type=int, default=None, help="crop size in px (data.image_size_px)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (data.batch_size_per_rank)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (data.num_workers_per_rank)")
    parser.add_argument("--steps", type=int, default=50, help="batches timed after the warm-up (default 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="batches read before timing (default: 2 per worker, at least 2)")
    parser.add_argument("--decode", choices=DECODES, default="auto",
                        help="fast: uint8 crops (pipeline.data.fast_image); plain: the PIL + timm transform; "
                             "auto: fast when the config's augmentation allows it")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic"), default=None,
                        help="resize filter of the crops (default: the config's data.interpolation)")
    parser.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class Measurement:
    samples: int
    batches: int
    wall_seconds: float
    cpu_seconds: float | None  # loader workers + this process, None where /proc is missing
    cores: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.wall_seconds, 1e-9)

    @property
    def samples_per_core_second(self) -> float:
        return self.samples_per_second / self.cores

    @property
    def samples_per_cpu_second(self) -> float | None:
        return self.samples / self.cpu_seconds if self.cpu_seconds else None


def run(args: argparse.Namespace) -> int:
    cfg = benchmark_config(args)
    shards = resolve_shards(cfg.data.train)
    kind = detect_kind(cfg.data.train, shards, families.get(cfg.model.kind).data_kind)
    decode = choose_decode(args.decode, cfg)
    loader = build_loader(cfg, shards, kind, decode)
    workers = cfg.data.num_workers_per_rank
    if workers == 0:
        torch.set_num_threads(1)  # one core, as a DataLoader worker has (and as the per-core figure says)
    warmup = args.warmup if args.warmup is not None else max(2, 2 * workers)
    total = sum(s.num_samples for s in shards)
    print(f"[benchmark-data] {kind} shards: {cfg.data.train} ({len(shards)} shards, {total} samples); "
          f"{decode} decode, {cfg.data.image_size_px} px, batch {cfg.data.batch_size_per_rank}, "
          f"{workers} worker(s), {warmup} warm-up + {args.steps} timed batches", flush=True)
    result = measure(loader, args.steps, warmup)
    print(summary_line(result, workers), flush=True)
    return 0


def benchmark_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    for flag, key in ((args.data, "train"), (args.image_size, "image_size_px"),
                      (args.batch_size, "batch_size_per_rank"), (args.workers, "num_workers_per_rank"),
                      (args.interpolation, "interpolation")):
        if flag is not None:
            overrides.append(f"data.{key}={flag}")
    if args.steps < 1 or (args.warmup is not None and args.warmup < 0):
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, overrides)
    families.check_config(cfg, args.config)  # model.kind and the rest that depends on it
    if args.data is None:
        from launch.prepare import ensure_sample_corpus

        ensure_sample_corpus(cfg, args.config)
    elif not storage.exists(args.data) and not any(c in args.data for c in "*?[{"):
        raise ValueError(f"--data: {args.data} does not exist")
    return cfg


def detect_kind(spec: str, shards: list[Shard], family_data_kind: str) -> str:
    """'labelled' or 'image_text': the manifest's kind, else the extensions of the first shard's samples (the
    model family's data kind when they hold both)."""
    first = spec.split("::")[0].strip()
    manifest = read_manifest(first)
    if manifest and manifest.get("kind") in LOADER_KINDS:
        return manifest["kind"]
    exts = sample_extensions(shards[0].path)
    has_image = bool(exts & set(IMAGE_EXTENSIONS))
    labelled, captioned = "cls" in exts, "txt" in exts or "json" in exts
    if has_image and labelled and captioned:
        return family_data_kind
    if has_image and labelled:
        return "labelled"
    if has_image and captioned:
        return "image_text"
    found = ", ".join(sorted(exts)) or "none"
    raise ValueError(f"{shards[0].path}: neither labelled (jpg + cls) nor image-text (jpg + txt/json) samples "
                     f"(extensions found: {found})")


def sample_extensions(path: str, max_members: int = 64) -> set[str]:
    exts: set[str] = set()
    if storage.is_remote(path):  # the member index (sidecar, cache or one read), not a local tar
        from pipeline.data.tar_index import read_index

        try:
            samples = read_index(path)
        except (OSError, tarfile.TarError) as err:
            raise unreadable_shard(path, err) from None
        return {ext for _, members in samples[:max_members] for ext, _, _ in members}
    try:
        with tarfile.open(path, "r|*") as tar:
            for count, member in enumerate(tar):
                if count >= max_members:
                    break
                name = os.path.basename(member.name)
                if member.isfile() and "." in name and not name.startswith("__"):
                    exts.add(name.split(".", 1)[1].lower())
    except (OSError, tarfile.TarError) as err:
        raise unreadable_shard(path, err) from None
    return exts


def choose_decode(requested: str, cfg: Config) -> str:
    why_not = fast_path_supported(cfg.data)
    if requested == "fast" and why_not:
        raise ValueError(f"--decode fast: {why_not}")
    if requested == "auto":
        return "plain" if why_not else "fast"
    return requested


def tokenizer_for(cfg: Config):
    """The config's CLIP tokenizer, else ViT-B-32's (open_clip's default BPE, context 77)."""
    family = families.get(cfg.model.kind)
    if family.tokenizer is not None:
        return family.tokenizer(cfg.model.name)
    import open_clip

    return open_clip.get_tokenizer(DEFAULT_TOKENIZER)


def build_loader(cfg: Config, shards: list[Shard], kind: str, decode: str) -> Iterable:
    """Rank 0 of 1 of exactly the loader the training task calls (same stream, workers, prefetch)."""
    data = dataclasses.replace(cfg.data, fast_decode=decode == "fast")
    if kind == "labelled":
        from pipeline.data.labelled import labelled_loader

        return labelled_loader(shards, data, 0, 1, seed=cfg.run.seed, training=True,
                               batch_size=data.batch_size_per_rank)
    from pipeline.data.image_text import image_text_loader

    return image_text_loader([shards], data, tokenizer_for(cfg), 0, 1, seed=cfg.run.seed, training=True,
                             batch_size=data.batch_size_per_rank)


def measure(loader: Iterable, steps: int, warmup: int) -> Measurement:
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    # The training iterable wraps the DataLoader (full_batches.py): its workers are the loader's.
    inner = getattr(batches, "loader_iterator", batches)
    pids = [w.pid for w in getattr(inner, "_workers", [])]
    cpu_start, wall_start = _cpu_seconds(pids), time.perf_counter()
    samples = 0
    for _ in range(steps):
        batch = next(batches).batch
        samples += len(batch[-1])
    wall = time.perf_counter() - wall_start
    cpu_end = _cpu_seconds(pids)
    del batches  # stops the workers
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return Measurement(samples, steps, wall, cpu, max(1, len(pids)))


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of this process and the given children so far (Linux /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def summary_line(result: Measurement, workers: int) -> str:
    cores = f"{workers} loader worker process(es)" if workers else "1: no workers, the main process decodes"
    line = (f"[benchmark-data] {result.samples_per_second:.1f} samples/s, "
            f"{result.samples_per_core_second:.1f} samples/s per core (cores = {cores}); "
            f"{result.samples} samples in {result.batches} batches, {result.wall_seconds:.2f} s")
    if result.samples_per_cpu_second is not None:
        line += f"; {result.samples_per_cpu_second:.1f} samples per CPU-second (workers + main process)"
    return line
