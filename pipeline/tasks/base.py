"""The contract between the shared training loop and a model family."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from pipeline import families
from pipeline.config import Config
from pipeline.data.fast_image import normalize_on_device
from pipeline.data.shards import Shard, resolve_shards
from pipeline.data.stream import Position, StreamBatch
from pipeline.optim import param_groups
from pipeline.precision import resolve_precision


class Task:
    """Subclasses bring the training stream, the loss and the validation of their family; the model and its
    weight-decay rule come from the family (pipeline.families)."""

    class_names: list[str] | None = None
    """Output i of the model = class_names[i] (classifiers trained on a manifest that lists them); recorded
    in every checkpoint's meta.json so evaluation can compare class lists by name."""

    num_classes: int | None = None
    """Head size of families with a classifier head; the family's build takes it."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.family = families.get(cfg.model.kind)
        self.train_shards: list[Shard] = resolve_shards(cfg.data.train)
        self.amp = device.type == "cuda" and resolve_precision(cfg.deepspeed.precision, True) == "bf16"
        """bf16 autocast (pipeline.precision.autocast) for forwards outside the engine: validation, a teacher."""
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    @classmethod
    def check(cls, cfg: Config) -> list[str] | None:
        """Task-specific preflight in the driver; raises ConfigError(key, message). Returns one-line notes
        the launcher prints (e.g. a validation class list mapped to the training one by name)."""

    @property
    def num_train_samples(self) -> int:
        return sum(s.num_samples for s in self.train_shards)

    def build_model(self) -> torch.nn.Module:
        return self.family.build(self.cfg, self.num_classes)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        # Trainable parameters only: locked (LiT) ones have requires_grad False and stay out.
        return param_groups(model, self.cfg.optim.weight_decay, exempt=self.family.no_weight_decay)

    def train_batches(self, rank: int, world_size: int, start: Position) -> Iterator[StreamBatch]:
        """Endless iterator of StreamBatch (batch, skips, Position after the batch) from `start` on.

        A stream that cannot say where it stands yields position None: resume then restarts its epoch."""
        raise NotImplementedError

    def loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        """Forward + loss of one micro-batch; returns (loss, samples in it)."""
        raise NotImplementedError

    def window_metrics(self) -> dict:
        """The task's own training numbers since the last log row, averaged over ranks and named as inside
        train/ (the trainer prefixes them); called on every rank at each log row. None by default."""
        return {}

    def evaluate(self, module: torch.nn.Module, rank: int, world_size: int) -> dict:
        """Metrics over the validation data, identical on every rank (all-reduced), named as inside val/
        (top1, samples ...; the trainer prefixes them) with accuracies as fractions (pipeline/metrics.py)."""
        return {}

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batches (the fast decode path) are normalised here, on the device; float ones just move."""
        return normalize_on_device(images, self.cfg.data.mean, self.cfg.data.std, self.device,
                                   memory_format=self.memory_format)


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    moved = values.to(device)
    dist.all_reduce(moved)
    return moved.cpu()
