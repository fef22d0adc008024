"""The per-worker training loop: the only module that talks to ray.train.

`train_loop_per_worker` is what Ray Train runs on each worker; `run_worker` is the same loop without
Ray (a plain process or torchrun: rank and world size from the environment), so it can be measured on
a machine where Ray is not installed.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.labelled import labelled_loader
from pipeline.data.shards import Shard, read_manifest, resolve_shards
from pipeline.engine import deepspeed_config, initialize, resolve_precision
from pipeline.metrics import MetricsLogger
from pipeline.models import build_model
from pipeline.optim import build_optimizer, build_scheduler, param_groups
from pipeline.tasks.classify import ClassifyTask, cross_entropy, topk_correct


@dataclass(frozen=True)
class Plan:
    """Step arithmetic of a run, identical on every rank."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_step: int


def make_plan(cfg: Config, num_train_samples: int, world_size: int) -> Plan:
    samples_per_step = cfg.data.batch_size_per_rank * cfg.deepspeed.gradient_accumulation_steps * world_size
    # Equal steps on every rank: the epoch is cut to whole global batches (the remainder is dropped).
    steps_per_epoch = num_train_samples // samples_per_step
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.train: {num_train_samples} samples are fewer than one global batch ({samples_per_step})"
        )
    total = math.ceil(cfg.schedule.epochs * steps_per_epoch)
    if cfg.schedule.max_steps is not None:
        total = min(total, cfg.schedule.max_steps)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    return Plan(steps_per_epoch, total, warmup, samples_per_step)


def num_classes_of(cfg: Config) -> int:
    if cfg.data.num_classes:
        return cfg.data.num_classes
    manifest = read_manifest(cfg.data.train) if os.path.isdir(cfg.data.train) else None
    if manifest and manifest.get("num_classes"):
        return int(manifest["num_classes"])
    raise ValueError("data.num_classes: not set and the training manifest does not give num_classes")


# ---------------------------------------------------------------- entry points


def train_loop_per_worker(config_dict: dict) -> None:
    """Ray Train entry: Ray has already formed the process group."""
    import ray.train

    ctx = ray.train.get_context()
    run_training(config_dict, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ray.train.report)


def run_worker(config_dict: dict) -> dict:
    """Plain-process entry (world size 1, or torchrun's environment variables)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ.setdefault("RANK", "0")), int(os.environ.setdefault("WORLD_SIZE", "1"))
    local_rank = int(os.environ.setdefault("LOCAL_RANK", "0"))
    return run_training(config_dict, rank, world, local_rank, report=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the loop


def _setup_process(cfg: Config, rank: int, local_rank: int) -> torch.device:
    on_gpu = torch.cuda.is_available() and cfg.ray.use_gpu is not False
    threads = cfg.ray.torch_threads_per_worker or max(1, int(cfg.ray.cpus_per_worker))
    torch.set_num_threads(threads)
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    torch.manual_seed(cfg.run.seed)  # same init on every rank; DeepSpeed broadcasts rank 0's anyway
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    return torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")


def run_training(config_dict: dict, rank: int, world_size: int, local_rank: int,
                 report: Callable[[dict], None] | None) -> dict:
    cfg = Config.from_dict(config_dict)
    device = _setup_process(cfg, rank, local_rank)
    run_dir = cfg.run_dir
    train_shards = resolve_shards(cfg.data.train)
    plan = make_plan(cfg, sum(s.num_samples for s in train_shards), world_size)
    num_classes = num_classes_of(cfg)

    model = build_model(cfg.model, num_classes)
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps, cfg.schedule, plan.steps_per_epoch)
    on_gpu = device.type == "cuda"
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size_per_rank, on_gpu)
    engine = initialize(model, optimizer, scheduler, ds_config)
    ema = _build_ema(engine.module, cfg.optim.ema_decay)

    start_step = _maybe_resume(cfg, engine, ema, rank)
    logger = MetricsLogger(run_dir, enabled=rank == 0, total_steps=plan.total_steps)
    if rank == 0:
        print(f"[pretrain] {world_size} rank(s) on {device.type}, {plan.steps_per_epoch} steps/epoch, "
              f"{plan.total_steps} steps, global batch {plan.samples_per_step}, starting at step {start_step}",
              flush=True)
    loop = _Loop(cfg, plan, engine, ema, device, rank, world_size, logger, report)
    loader = labelled_loader(
        train_shards, cfg.data, rank, world_size, seed=cfg.run.seed, training=True,
        batch_size=cfg.data.batch_size_per_rank, start_epoch=start_step // plan.steps_per_epoch,
        generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + rank * 7 + start_step),
    )
    final = loop.run(iter(loader), start_step, num_classes)
    logger.close()
    return final


def _build_ema(module: torch.nn.Module, decay: float | None):
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=decay)


def _maybe_resume(cfg: Config, engine, ema, rank: int) -> int:
    ckpt_dir = checkpoint.find_latest_complete(cfg.run_dir) if cfg.checkpoint.resume else None
    if ckpt_dir is None:
        return 0
    client_state = checkpoint.load(engine, ckpt_dir)
    if ema is not None and "ema" in client_state:
        ema.module.load_state_dict(client_state["ema"])
    step = int(client_state.get("step", checkpoint.read_meta(ckpt_dir)["step"]))
    if rank == 0:
        print(f"[pretrain] resumed from {ckpt_dir} at step {step}", flush=True)
    return step


class _Loop:
    """Holds what every step needs, so the step and its bookkeeping stay short functions."""

    def __init__(self, cfg: Config, plan: Plan, engine, ema, device, rank: int, world_size: int,
                 logger: MetricsLogger, report):
        self.cfg, self.plan, self.engine, self.ema, self.device = cfg, plan, engine, ema, device
        self.rank, self.world_size, self.logger, self.report = rank, world_size, logger, report
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.val_shards = resolve_shards(cfg.data.val) if cfg.data.val else []
        self.autocast = device.type == "cuda" and resolve_precision(cfg.deepspeed.precision, True) == "bf16"

    def run(self, batches, start_step: int, num_classes: int) -> dict:
        cfg, plan = self.cfg, self.plan
        task = ClassifyTask(cfg.optim, cfg.data, num_classes)
        window = _Window(self.device)
        final: dict = {}
        if start_step >= plan.total_steps:
            # Relaunching a finished run: nothing to train; report where it stands.
            return {"step": start_step, **self.validate()}
        self.engine.train()
        for step in range(start_step + 1, plan.total_steps + 1):
            for _ in range(cfg.deepspeed.gradient_accumulation_steps):
                window.data_started()
                (images, labels), skipped = next(batches)
                window.data_done(skipped)
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                loss, _ = task(self.engine, images, labels)
                self.engine.backward(loss)
                self.engine.step()
                window.add(loss.detach(), len(labels))
            if self.ema is not None:
                self.ema.update(self.engine.module, step=step)
            final = self._after_step(step, window)
        return final

    def _after_step(self, step: int, window: "_Window") -> dict:
        cfg, last = self.cfg, step == self.plan.total_steps
        metrics: dict = {}
        if step % cfg.run.log_every_steps == 0 or last:
            metrics.update(window.flush(self.world_size), epoch=round(step / self.plan.steps_per_epoch, 3),
                           lr=self.engine.get_lr()[0])
        if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or (last and cfg.eval.at_end):
            metrics.update(self.validate())
        if metrics:
            self.logger.log(step, metrics)
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or last:
            self.save(step)
            metrics["checkpoint"] = str(checkpoint.checkpoints_root(cfg.run_dir) / checkpoint.step_tag(step))
        if metrics and self.report is not None:
            self.report({"step": step, **metrics})  # every rank reports: Ray Train v2 syncs on it
        if last and self.rank == 0:
            (cfg.run_dir / "final_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        return metrics

    def save(self, step: int) -> None:
        cfg = self.cfg
        client_state = {"step": step}
        if self.ema is not None:
            client_state["ema"] = self.ema.module.state_dict()
        meta = {"epoch": step / self.plan.steps_per_epoch, "config": cfg.to_dict(),
                "zero_stage": cfg.deepspeed.zero_stage, "world_size": self.world_size}
        checkpoint.save(self.engine, cfg.run_dir, step, meta, client_state, is_rank0=self.rank == 0)
        if self.rank == 0:
            checkpoint.apply_retention(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)

    def validate(self) -> dict:
        if not self.val_shards:
            return {}
        results = {f"val_{k}": v for k, v in self._evaluate(self.engine.module).items()}
        if self.ema is not None:
            results.update({f"val_ema_{k}": v for k, v in self._evaluate(self.ema.module).items()})
        self.engine.train()
        return results

    @torch.no_grad()
    def _evaluate(self, module: torch.nn.Module) -> dict:
        cfg = self.cfg
        module.eval()
        loader = labelled_loader(self.val_shards, cfg.data, self.rank, self.world_size, seed=cfg.run.seed,
                                 training=False, batch_size=cfg.eval.batch_size_per_rank or cfg.data.batch_size_per_rank)
        totals = torch.zeros(4, dtype=torch.float64)  # samples, top1 hits, top5 hits, summed loss
        for (images, labels), _ in loader:
            images = images.to(self.device).contiguous(memory_format=self.memory_format)
            labels = labels.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = module(images)
            hits = topk_correct(logits, labels)
            totals += torch.tensor([len(labels), hits[1], hits[5], float(cross_entropy(logits, labels))],
                                   dtype=torch.float64)
        totals = _all_reduce_sum(totals, self.device)
        n = max(totals[0].item(), 1.0)
        return {"top1": 100 * totals[1].item() / n, "top5": 100 * totals[2].item() / n,
                "loss": totals[3].item() / n, "samples": int(totals[0].item())}


def _all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    moved = values.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


class _Window:
    """Loss, throughput and data-wait accumulated between log rows; one host sync per log row."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.micro_steps = 0
        self.samples = 0
        self.wait_seconds = 0.0
        self.skipped: dict[str, int] = {}
        self.started = time.perf_counter()

    def data_started(self) -> None:
        self._wait_start = time.perf_counter()

    def data_done(self, skipped) -> None:
        self.wait_seconds += time.perf_counter() - self._wait_start
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def add(self, loss: torch.Tensor, num_samples: int) -> None:
        self.loss_sum += loss.float()
        self.micro_steps += 1
        self.samples += num_samples

    def flush(self, world_size: int) -> dict:
        elapsed = time.perf_counter() - self.started
        loss = _all_reduce_sum(torch.stack([self.loss_sum.detach().cpu().double(),
                                            torch.tensor(float(self.micro_steps), dtype=torch.float64)]),
                               self.device)
        row = {
            "loss": loss[0].item() / max(loss[1].item(), 1.0),
            "samples_per_second": self.samples * world_size / max(elapsed, 1e-9),
            "data_wait_seconds": self.wait_seconds,
            "data_wait_fraction": self.wait_seconds / max(elapsed, 1e-9),
        }
        if self.skipped:
            row["skipped_samples"] = dict(self.skipped)
        self._reset()
        return row
