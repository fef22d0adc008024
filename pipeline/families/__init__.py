"""Model families: one registered spec (pipeline.families.spec.ModelFamily) per `model.kind`.

A family is everything the stages need to know about one kind of model: how to build it, load its
library's weights strictly, rebuild it from our checkpoints, transform images for evaluation, take its image
features, which parameters skip weight decay, its training and distillation tasks, which evaluation tasks
score it and which config values it accepts. Training (pipeline.tasks), evaluation (resolver, linear probe,
eval tasks, export), the launcher's preflight and the worker ask the family; no stage keys a table by kind
strings of its own. A new family is one file in this folder defining `FAMILY = ModelFamily(...)` plus one
line in FAMILIES below.

Layering (each layer imports only the ones below it; tests/test_layers.py holds the full table):

    launch -> pipeline.trainer -> pipeline.tasks -> pipeline.evaluation -> pipeline.families
           -> pipeline.models, pipeline.data -> checkpoint, optim, ... -> pipeline.config -> pipeline.storage

Families sit below evaluation and tasks, which ask them, and above the models and data they are made of.
A family names its training tasks as 'module:Class' strings that pipeline.tasks.task_class imports on
demand: the one upward reference, by name only, so that evaluation can ask a family without a circle.

Config validation is split in two for the same reason. pipeline.config (the lowest layer, which must not
import families) checks what holds for every run; `check_config` here checks what depends on the family
(the kind exists, contrastive.loss, eval.zeroshot, distillation). The launcher's preflight, the worker
(through pipeline.tasks.task_class) and the resolver (for a checkpoint's recorded config) call it, so every
path from a config to a model passes it. A data-only table of kinds in config.py was the alternative; it
would be a second list to keep in step with this one.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

from pipeline.config import Config, ConfigError
from pipeline.families.spec import ModelFamily, Rebuilt

__all__ = ["FAMILIES", "ModelFamily", "Rebuilt", "all_families", "by_library", "check_config", "get", "names",
           "registered"]

# model.kind -> the module defining its FAMILY, imported when the kind is first asked for (a classifier run
# never imports open_clip). Order matters once: `--model NAME` is looked up in the families' libraries in
# this order, and open_clip and timm share a few names (convnext_base, ...), which have always meant open_clip.
FAMILIES: dict[str, str | ModelFamily] = {
    "clip": "pipeline.families.clip",
    "classifier": "pipeline.families.classifier",
}


def names() -> list[str]:
    """The valid model.kind values, sorted (for messages)."""
    return sorted(FAMILIES)


def get(kind: str) -> ModelFamily:
    """The family registered as `kind`; ValueError listing the valid kinds otherwise."""
    entry = FAMILIES.get(kind)
    if entry is None:
        raise ValueError(f"unknown model kind {kind!r} (valid: {', '.join(names())})")
    if isinstance(entry, ModelFamily):
        return entry
    family = importlib.import_module(entry).FAMILY
    assert isinstance(family, ModelFamily) and family.name == kind, f"{entry}.FAMILY is not the {kind!r} family"
    return family


def all_families() -> list[ModelFamily]:
    """Every registered family, in registration order (imports each family's module)."""
    return [get(kind) for kind in FAMILIES]


def by_library(library: str) -> ModelFamily | None:
    """The family whose architectures come from `library` ('timm', 'open_clip'), if any."""
    return next((f for f in all_families() if f.library == library), None)


@contextlib.contextmanager
def registered(family: ModelFamily) -> Iterator[ModelFamily]:
    """Register `family` for the duration of a `with` block (tests, experiments), then restore the registry."""
    before = dict(FAMILIES)
    FAMILIES[family.name] = family
    try:
        yield family
    finally:
        FAMILIES.clear()
        FAMILIES.update(before)


def check_config(cfg: Config, source: str = "<config>") -> ModelFamily:
    """The family-dependent half of config validation (see the module docstring); returns the family.
    Raises ConfigError naming the key and `source`."""
    kind = cfg.model.kind
    if kind not in FAMILIES:
        raise ConfigError("model.kind", f"must be one of {', '.join(names())}, got {kind!r}", source)
    family = get(kind)
    losses = family.contrastive_losses
    if losses and cfg.contrastive.loss not in losses:
        raise ConfigError("contrastive.loss", f"must be one of {', '.join(losses)}, got {cfg.contrastive.loss!r}",
                          source)
    if cfg.eval.zeroshot and "zeroshot" not in family.eval_tasks:
        able = " or ".join(f.name for f in all_families() if "zeroshot" in f.eval_tasks)
        raise ConfigError("eval.zeroshot", f"zero-shot sets need model.kind: {able}", source)
    if cfg.distill.teacher and family.distill_task is None:
        raise ConfigError("distill.teacher", f"model.kind {kind} cannot be distilled into", source)
    return family
