"""Tasks: what a model family brings to the shared training loop (model, data, loss, evaluation).

Registry keyed by model.kind; a module is imported only when its kind is used.
"""
from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "classifier": "pipeline.tasks.classify:ClassifyTask",
    "clip": "pipeline.tasks.contrastive:ContrastiveTask",
    "distill:classifier": "pipeline.tasks.distill:DistillClassifierTask",
    "distill:clip": "pipeline.tasks.distill:DistillContrastiveTask",
}


def task_key(cfg) -> str:
    """The task a config runs: its model kind, distilled from a teacher when distill.teacher is set."""
    return f"distill:{cfg.model.kind}" if cfg.distill.teacher else cfg.model.kind


def task_class(kind: str):
    if kind not in TASKS:
        raise ValueError(f"model.kind: no task for {kind!r} (valid: {', '.join(TASKS)})")
    module, name = TASKS[kind].split(":")
    return getattr(importlib.import_module(module), name)
