"""eval.async: one Ray actor, with CPUs/GPUs of its own, evaluates each checkpoint the run completes while the
ranks keep training; rank 0 hands it checkpoint paths and collects finished rows without waiting
(pipeline/trainer.py). What is evaluated and how the keys read: pipeline/evaluation/follow.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import Config

# The evaluation stack (pipeline.evaluation.follow: open_clip, timm, DeepSpeed's consolidation, scikit-learn) is
# imported inside the actor only: rank 0, which holds the handle, trains without loading it.


class CheckpointEvaluator:
    """The actor's body: `launch eval` on one checkpoint dir over the run's sets, as one metrics row."""

    def __init__(self, config_dict: dict, num_cpus: float):
        # Below the ranks' priority, before the heavy imports: where Ray was told of more CPUs than the machine
        # has (the embedded cluster on a small machine), evaluation takes the cycles training leaves; on CPUs
        # of its own it runs as fast as ever.
        os.nice(10)
        import torch

        from pipeline.evaluation.follow import eval_options, eval_sets

        cfg = Config.from_dict(config_dict)
        # Within the CPUs Ray reserved for us: torch would otherwise take every core from the training ranks.
        torch.set_num_threads(max(1, int(num_cpus)))
        self.sets = eval_sets(cfg)
        self.options = eval_options(cfg, num_cpus)

    def evaluate(self, ckpt_dir: str) -> tuple[int, dict]:
        from pipeline.evaluation.follow import checkpoint_step, evaluate_checkpoint, metrics_row

        results = evaluate_checkpoint(Path(ckpt_dir), self.sets, self.options)
        return checkpoint_step(Path(ckpt_dir)), {"checkpoint": ckpt_dir, **metrics_row(self.sets, results)}


class AsyncEvaluation:
    """Rank 0's handle on the evaluation actor: submit checkpoints, collect finished rows in step order."""

    def __init__(self, cfg: Config):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise ValueError("eval.async: needs Ray (launch pretrain without --no-ray); or set eval.async false "
                             "and run `launch eval --follow RUN_DIR` beside the run")
        eval_cfg = cfg.eval
        # Outside the training workers' placement group: its bundles hold only the ranks' own resources.
        self._actor = ray.remote(CheckpointEvaluator).options(
            num_cpus=eval_cfg.async_num_cpus, num_gpus=eval_cfg.async_num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        ).remote(cfg.to_dict(), eval_cfg.async_num_cpus)
        self._pending: dict = {}  # ObjectRef -> checkpoint dir

    def submit(self, ckpt_dir: Path) -> None:
        self._pending[self._actor.evaluate.remote(str(ckpt_dir))] = Path(ckpt_dir)

    def in_flight(self) -> set[Path]:
        """Checkpoints handed over and not yet evaluated: retention must keep them (pipeline.checkpoint)."""
        return set(self._pending.values())

    def finished(self, timeout_s: float | None = 0) -> list[tuple[int, dict]]:
        """(step, row) of every evaluation done by now (timeout_s=0: no waiting; None: wait for all)."""
        import ray

        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout_s)
        rows = []
        for ref in ready:
            ckpt_dir = self._pending.pop(ref)
            try:
                rows.append(ray.get(ref))
            except Exception as err:  # a failed evaluation is reported, never a reason to stop training
                lines = str(err).strip().splitlines()
                print(f"[pretrain] warning: eval.async: evaluating {ckpt_dir} failed: "
                      f"{lines[-1] if lines else type(err).__name__}", flush=True)
        return sorted(rows, key=lambda item: item[0])

    def close(self) -> None:
        import ray

        ray.kill(self._actor)
