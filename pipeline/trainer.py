"""The per-worker training loop: the only module that talks to ray.train.

`train_loop_per_worker` is what Ray Train runs on each worker; `run_worker` is the same loop without
Ray (a plain process or torchrun: rank and world size from the environment), so it can be measured on
a machine where Ray is not installed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.stream import Position, seed_sample_rng
from pipeline.engine import deepspeed_config, initialize
from pipeline.metrics import TRAIN, VAL, VAL_EMA, MetricsLogger, prefixed
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.preemption import PREEMPTED_RECORD, Preemption, request_url
from pipeline.profiling import PROFILE_DIR, StepProfiler
from pipeline.run_mirror import RunMirror, read_run_json, run_file_exists, shown, write_run_file
from pipeline.tasks import task_class
from pipeline.tasks.base import Task, all_reduce_sum


@dataclass(frozen=True)
class StepPlan:
    """Step arithmetic of a run, identical on every rank."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_step: int


def make_plan(cfg: Config, num_train_samples: int, world_size: int) -> StepPlan:
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
    return StepPlan(steps_per_epoch, total, warmup, samples_per_step)


# ---------------------------------------------------------------- entry points


def train_loop_per_worker(config_dict: dict) -> None:
    """Ray Train entry: Ray has already formed the process group."""
    import ray.train

    ctx = ray.train.get_context()
    run_training(config_dict, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ray.train.report)


def run_worker(config_dict: dict) -> dict:
    """Plain-process entry (world size 1, or torchrun's environment variables)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ.setdefault("RANK", "0")), int(os.environ.setdefault("WORLD_SIZE", "1"))
    local_rank = int(os.environ.setdefault("LOCAL_RANK", "0"))
    return run_training(config_dict, rank, world, local_rank, report=None)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous of a plain-process or benchmark process group)."""
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
        # What timm's and open_clip's training scripts set: fixed input shapes let cuDNN pick by benchmark;
        # TF32 only touches the fp32 parts of an autocast step.
        torch.backends.cudnn.benchmark = cfg.ray.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = cfg.ray.tf32_matmul
        torch.backends.cudnn.allow_tf32 = cfg.ray.tf32_matmul
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    return torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")


def run_training(config_dict: dict, rank: int, world_size: int, local_rank: int,
                 report: Callable[[dict], None] | None) -> dict:
    cfg = Config.from_dict(config_dict)
    device = _setup_process(cfg, rank, local_rank)
    task: Task = task_class(cfg)(cfg, device)
    plan = make_plan(cfg, task.num_train_samples, world_size)

    model = task.build_model()
    if cfg.model.compile:
        # In place (nn.Module.compile): state_dict keys stay plain, so checkpoints, export and eval are
        # the same as an eager run's. DeepSpeed's gradient hooks sit on the parameters and still fire.
        model.compile(mode=cfg.model.compile_mode)
    optimizer = build_optimizer(task.param_groups(model), cfg.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps, cfg.schedule, plan.steps_per_epoch)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size_per_rank, device.type == "cuda")
    engine = initialize(model, optimizer, scheduler, ds_config)
    ema = _build_ema(engine.module, cfg.optim.ema_decay)

    mirror = RunMirror(cfg, rank, world_size, local_rank)  # a run in a bucket: staged here, mirrored there
    start_step, position = _maybe_resume(cfg, engine, ema, rank, plan, mirror)
    trackers = _start_trackers(cfg, start_step) if rank == 0 else None
    logger = MetricsLogger(cfg.run_dir, enabled=rank == 0, total_steps=plan.total_steps, trackers=trackers)
    if rank == 0:
        print(f"[pretrain] {world_size} rank(s) on {device.type}, {plan.steps_per_epoch} steps/epoch, "
              f"{plan.total_steps} steps, global batch {plan.samples_per_step}, starting at step {start_step}",
              flush=True)
    loop = _Loop(cfg, plan, task, engine, ema, rank, world_size, logger, report)
    loop.position, loop.mirror = position, mirror
    loop.preemption = Preemption(cfg.run_dir, rank, world_size, request_url(cfg))
    loop.async_eval = _start_async_eval(cfg) if cfg.eval.async_ and rank == 0 else None
    outcome = "failed"
    try:
        final = loop.run(task.train_batches(rank, world_size, position), start_step)
        outcome = "preempted" if final.get("preempted") else "finished"
        if not final.get("preempted"):  # a preempted run has no time to wait: `launch eval --follow` can catch up
            final = {**final, **loop.finish_async_eval()}
    finally:
        loop.preemption.close()
        if loop.async_eval is not None:
            loop.async_eval.close()
        logger.close()
        if trackers is not None:
            trackers.finish(outcome)  # a finished run's record as artifacts, then the tracked runs end
    mirror.finish()  # the last checkpoint complete in the bucket, metrics and TensorBoard events beside it
    return final if final.get("preempted") else {"step": plan.total_steps, **final}


def _start_async_eval(cfg: Config):
    # Imported here: the evaluation stack (open_clip, scikit-learn) loads only into runs that ask for it.
    from pipeline.evaluation.async_eval import AsyncEvaluation

    return AsyncEvaluation(cfg)


def _start_trackers(cfg: Config, start_step: int):
    """Rank 0's experiment trackers (run.trackers). A resumed run continues the tracked runs trackers.json
    names; the ids are written at once (to the bucket too, for a run there), before the first checkpoint."""
    # Imported here: the pipeline.reporting package loads matplotlib, which training does not need otherwise.
    from pipeline.reporting.trackers import TRACKERS_RECORD, Trackers, flat_params

    previous = (read_run_json(cfg, TRACKERS_RECORD) or {}) if start_step > 0 else {}
    trackers = Trackers.start(cfg.run.trackers, cfg.run_dir, cfg.run.name, flat_params(cfg.to_dict()), previous)
    if trackers.ids:
        write_run_file(cfg, TRACKERS_RECORD, trackers.record())
    return trackers


def _build_ema(module: torch.nn.Module, decay: float | None):
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=decay)


def _maybe_resume(cfg: Config, engine, ema, rank: int, plan: StepPlan, mirror: RunMirror) -> tuple[int, Position]:
    """(step, data position) to continue from: the latest complete checkpoint's, or the start."""
    ckpt_dir = mirror.resume_point() if cfg.checkpoint.resume else None
    if ckpt_dir is None:
        return 0, Position()
    client_state = checkpoint.load(engine, ckpt_dir)
    if ema is not None and "ema" in client_state:
        ema.module.load_state_dict(client_state["ema"])
    step = int(client_state.get("step", checkpoint.read_meta(ckpt_dir)["step"]))
    saved = client_state.get("data_position")
    # Without a saved position (a stream that cannot tell), restart the epoch the step falls in.
    position = Position(**saved) if saved else Position(epoch=step // plan.steps_per_epoch)
    if rank == 0:
        print(f"[pretrain] resumed from {shown(cfg, ckpt_dir)} at step {step}, data {position}", flush=True)
    return step, position


class _Loop:
    """Holds what every step needs, so the step and its bookkeeping stay short functions."""

    def __init__(self, cfg: Config, plan: StepPlan, task: Task, engine, ema, rank: int, world_size: int,
                 logger: MetricsLogger, report):
        self.cfg, self.plan, self.task, self.engine, self.ema = cfg, plan, task, engine, ema
        self.rank, self.world_size, self.logger, self.report = rank, world_size, logger, report
        self.position: Position | None = Position()
        self.preemption: Preemption | None = None
        self.mirror: RunMirror | None = None
        self.async_eval = None  # rank 0 with eval.async: pipeline.evaluation.async_eval.AsyncEvaluation

    def run(self, batches, start_step: int) -> dict:
        cfg, plan = self.cfg, self.plan
        window = _Window(self.task.device)
        final: dict = {}
        if start_step >= plan.total_steps:
            # Relaunching a finished run: nothing to train; report where it stands.
            return {"step": start_step, **self.validate()}
        self.engine.train()
        profiler = StepProfiler(cfg.run.profile_steps, cfg.run_dir / PROFILE_DIR, self.task.device,
                                enabled=self.rank == 0)
        done = start_step  # the last step whose optimizer update ran: a profile window cut short ends there
        try:
            for step in range(start_step + 1, plan.total_steps + 1):
                profiler.before_step(step)
                self._optimizer_step(step, batches, window)
                done = step
                profiler.after_step(step)
                if not cfg.run.inject_failure_in_checkpoint:
                    self._maybe_inject_failure(step)
                final = self._after_step(step, window)
                if step < plan.total_steps and self.preemption is not None and self.preemption.agreed():
                    return self._stop_preempted(step, final)
            return final
        except BaseException:
            profiler.close(done, failing=True)  # the run's error, not a profile write's, goes up
            raise
        finally:
            profiler.close(done)  # a no-op once closed

    def _optimizer_step(self, step: int, batches, window: "_Window") -> None:
        """One optimizer step: gradient_accumulation_steps micro-batches, then the EMA update."""
        cfg = self.cfg
        for micro in range(cfg.deepspeed.gradient_accumulation_steps):
            window.data_started()
            item = next(batches)
            window.data_done(item.skips)
            self.position = item.position
            # Mixup, drop-path and dropout draw from RNG seeded by (step, rank): a resumed run draws what
            # the uninterrupted run drew.
            seed_sample_rng(cfg.run.seed, step * 1000 + micro, -1 - self.rank)
            loss, num_samples = self.task.loss(self.engine, item.batch)
            self.engine.backward(loss)
            self.engine.step()
            window.add(loss.detach(), num_samples)
        if self.ema is not None:
            self.ema.update(self.engine.module, step=step)

    def _stop_preempted(self, step: int, metrics: dict) -> dict:
        """Every rank is here at the same step: checkpoint it (unless this step just did) and stop."""
        path = shown(self.cfg, checkpoint.checkpoints_root(self.cfg.run_dir) / checkpoint.step_tag(step))
        if "checkpoint" not in metrics:
            self.save(step)
        outcome = {"step": step, "preempted": True, "checkpoint": path}
        if self.report is not None:
            self.report(outcome)
        if self.rank == 0:
            (self.cfg.run_dir / PREEMPTED_RECORD).write_text(json.dumps(outcome, indent=1))
            print(f"[pretrain] preempted: complete checkpoint at step {step} ({path}); relaunch the same "
                  f"command to resume at the next sample", flush=True)
        return outcome

    def _after_step(self, step: int, window: "_Window") -> dict:
        cfg, last = self.cfg, step == self.plan.total_steps
        metrics: dict = {}
        self._log_async_eval(timeout_s=0)
        if step % cfg.run.log_every_steps == 0 or last:
            metrics.update(prefixed(TRAIN, {**window.flush(self.world_size), **self.task.window_metrics(),
                                            "lr": self.engine.get_lr()[0]}),
                           epoch=round(step / self.plan.steps_per_epoch, 3))
        if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or (last and cfg.eval.at_end):
            metrics.update(self.validate())
        if metrics:
            self.logger.log(step, metrics)
            if self.mirror is not None:
                self.mirror.maybe_sync_run_files()
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or last:
            self.save(step)
            metrics["checkpoint"] = shown(cfg, checkpoint.checkpoints_root(cfg.run_dir) / checkpoint.step_tag(step))
        if metrics and self.report is not None:
            self.report({"step": step, **metrics})  # every rank reports: Ray Train v2 syncs on it
        if last and self.rank == 0:
            (cfg.run_dir / "final_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        return metrics

    def save(self, step: int) -> None:
        cfg = self.cfg
        self._average_buffers()  # the checkpoint holds the statistics validation used
        client_state = {"step": step}
        if self.position is not None:
            client_state["data_position"] = dataclasses.asdict(self.position)  # epoch, offset, spares
        if self.ema is not None:
            client_state["ema"] = self.ema.module.state_dict()
        meta = {"epoch": step / self.plan.steps_per_epoch, "config": cfg.to_dict(),
                "zero_stage": cfg.deepspeed.zero_stage, "world_size": self.world_size}
        if self.task.class_names:  # what output i means: evaluation compares class lists by name
            meta["class_names"] = list(self.task.class_names)
        after_shards = self._maybe_inject_failure if cfg.run.inject_failure_in_checkpoint else None
        if self.mirror is not None:  # the previous checkpoint's uploads end here at the latest
            self.mirror.before_save(step)
        ckpt_dir = checkpoint.save(self.engine, cfg.run_dir, step, meta, client_state, is_rank0=self.rank == 0,
                                   after_shards=after_shards)
        if self.mirror is not None:
            self.mirror.after_save(ckpt_dir, meta)
        if self.async_eval is not None:
            self.async_eval.submit(ckpt_dir)
        if self.rank == 0:
            # Checkpoints still waiting for their evaluation survive retention until a later save.
            checkpoint.apply_retention(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                       self.async_eval.in_flight() if self.async_eval is not None else frozenset())

    def _log_async_eval(self, timeout_s: float | None) -> dict[int, dict]:
        """Rows of finished asynchronous evaluations, logged at their checkpoints' steps (rank 0 holds the actor)."""
        if self.async_eval is None:
            return {}
        logged: dict[int, dict] = {}
        for step, row in self.async_eval.finished(timeout_s):
            self.logger.log(step, row)
            logged.setdefault(step, {}).update(row)
        return logged

    def finish_async_eval(self) -> dict:
        """The end of the run waits for every outstanding evaluation, then retention removes what they kept.
        Returns the last step's evaluation row, which also joins final_metrics.json (written before the wait)."""
        if self.async_eval is None:
            return {}
        last_row = self._log_async_eval(timeout_s=None).get(self.plan.total_steps, {})
        checkpoint.apply_retention(self.cfg.run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        final_file = self.cfg.run_dir / "final_metrics.json"
        if last_row and final_file.is_file():
            final_file.write_text(json.dumps({**json.loads(final_file.read_text()), **last_row}, indent=1))
        return last_row

    def _maybe_inject_failure(self, step: int) -> None:
        """Fault drill (run.inject_failure_at_step): the last rank dies once, as a killed process would."""
        if step != self.cfg.run.inject_failure_at_step or self.rank != self.world_size - 1:
            return
        marker = self.cfg.run_dir / f".injected_failure_{step}"
        if marker.exists() or run_file_exists(self.cfg, marker.name):
            return
        write_run_file(self.cfg, marker.name, "the fault drill killed this rank here once\n")
        print(f"[pretrain] fault drill: rank {self.rank} exits at step {step}", flush=True)
        os._exit(17)

    def _average_buffers(self) -> None:
        average_buffers(self.engine.module)
        if self.ema is not None:
            average_buffers(self.ema.module)

    def validate(self) -> dict:
        self._average_buffers()
        results = prefixed(VAL, self._evaluate(self.engine.module))
        if self.ema is not None:
            results.update(prefixed(VAL_EMA, self._evaluate(self.ema.module)))
        self.engine.train()
        return results

    def _evaluate(self, module: torch.nn.Module) -> dict:
        module.eval()
        return self.task.evaluate(module, self.rank, self.world_size)


def _gather_counts(counts: dict[str, int]) -> dict[str, int]:
    """Skip reasons summed over every rank (each rank decodes only its own share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counts)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(counts))
    total: dict[str, int] = {}
    for part in parts:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + count
    return total


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average float buffers (BatchNorm running statistics) over ranks, as timm's distribute_bn does.

    DeepSpeed keeps buffers rank-local: each rank's BN statistics come from its own samples. Left alone,
    validation would score each rank's share with different statistics and the checkpoint would keep
    rank 0's only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())


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
        """The window's numbers, named as inside train/ (the caller prefixes them); starts the next window."""
        elapsed = time.perf_counter() - self.started
        loss = all_reduce_sum(torch.stack([self.loss_sum.detach().cpu().double(),
                                            torch.tensor(float(self.micro_steps), dtype=torch.float64)]),
                               self.device)
        row = {
            "loss": loss[0].item() / max(loss[1].item(), 1.0),
            "samples_per_second": self.samples * world_size / max(elapsed, 1e-9),
            "data_wait_seconds": self.wait_seconds,
            "data_wait_fraction": self.wait_seconds / max(elapsed, 1e-9),
        }
        skipped = _gather_counts(self.skipped)
        if skipped:
            row["skipped_samples"] = skipped
        self._reset()
        return row
