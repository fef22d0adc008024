"""Tasks: what a model family brings to the shared training loop (model, data, loss, evaluation).

Which task a config runs is its family's (pipeline.families: `task`, or `distill_task` when distill.teacher
is set); a task's module is imported only when a run uses it.
"""
from __future__ import annotations

import importlib

from pipeline import families
from pipeline.config import Config


def task_class(cfg: Config, source: str = "<config>") -> type:
    """The pipeline.tasks.base.Task subclass `cfg` trains with, after the family's config checks
    (ConfigError naming the key and `source`)."""
    family = families.check_config(cfg, source)
    spec = family.distill_task if cfg.distill.teacher else family.task
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)
