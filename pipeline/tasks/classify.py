"""Image classification: timm residual networks on labelled shards.

Cross-entropy (label smoothing) or BCE (ResNet strikes back), mixup/cutmix, top-1/top-5 validation.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pipeline.class_names import LabelMap, manifest_class_names, map_by_name
from pipeline.config import Config, ConfigError
from pipeline.data.labelled import labelled_loader
from pipeline.data.shards import read_manifest, resolve_shards
from pipeline.evaluation.metrics import topk_correct
from pipeline.models.residual import model_factory
from pipeline.precision import autocast
from pipeline.sample_counts import sample_shortfall
from pipeline.tasks.base import Task, all_reduce_sum


def num_classes_of(cfg: Config) -> int:
    if cfg.data.num_classes:
        return cfg.data.num_classes
    manifest = read_manifest(cfg.data.train)
    if manifest and manifest.get("num_classes"):
        return int(manifest["num_classes"])
    raise ConfigError("data.num_classes", "not set and the training manifest does not give num_classes")


def train_class_names(cfg: Config) -> list[str] | None:
    """The class names the training manifest records (output i of the model = name i), if any."""
    try:
        names = manifest_class_names(cfg.data.train)
    except ValueError as err:
        raise ConfigError("data.train", str(err)) from None
    if names and cfg.data.num_classes and len(names) > cfg.data.num_classes:
        raise ConfigError("data.num_classes", f"{cfg.data.num_classes}, but the training manifest lists "
                          f"{len(names)} classes: labels past {cfg.data.num_classes - 1} would have no output")
    return names


def val_label_map(cfg: Config) -> LabelMap:
    """How validation labels become training classes: by name when the validation manifest lists the same
    classes in another order or a subset of them; ConfigError when it names classes training does not know."""
    if not cfg.data.val:
        return LabelMap()
    try:
        val_names = manifest_class_names(cfg.data.val)
        return map_by_name(val_names, train_class_names(cfg), "the validation set", "the training set (data.train)")
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError("data.val", str(err)) from None


def build_loss(optim_cfg, mixing: bool) -> torch.nn.Module:
    if optim_cfg.loss == "bce":
        # Mixup already smooths the targets it makes; BCE smooths only hard targets. The threshold then
        # binarises the mixed targets (ResNet strikes back: 0.2), as timm's train.py passes it.
        return BinaryCrossEntropy(smoothing=0.0 if mixing else optim_cfg.label_smoothing,
                                  target_threshold=optim_cfg.bce_target_threshold)
    if mixing:
        return SoftTargetCrossEntropy()
    if optim_cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(optim_cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


class ClassifyTask(Task):
    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.num_classes = num_classes_of(cfg)
        data = cfg.data
        mixing = data.mixup_alpha > 0 or data.cutmix_alpha > 0
        self.mixup = Mixup(
            mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha, prob=data.mixup_prob,
            label_smoothing=cfg.optim.label_smoothing, num_classes=self.num_classes,
        ) if mixing else None
        self.loss_fn = build_loss(cfg.optim, mixing)
        self.val_shards = resolve_shards(data.val) if data.val else []
        self.class_names = train_class_names(cfg)
        self.val_labels = val_label_map(cfg)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        num_classes_of(cfg)
        train_class_names(cfg)
        try:
            model_factory(cfg.model.name)
        except ValueError as err:
            raise ConfigError("model.name", str(err).split(": ", 1)[1]) from None
        note = val_label_map(cfg).note
        return [f"data.val: {note}"] if note else []

    def train_batches(self, rank, world_size, start):
        cfg = self.cfg
        return iter(labelled_loader(self.train_shards, cfg.data, rank, world_size, seed=cfg.run.seed,
                                    training=True, batch_size=cfg.data.batch_size_per_rank, start=start))

    def mixed_view(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, mixed up when configured: (images, targets)."""
        images, labels = batch
        if self.mixup is not None and len(labels) % 2:
            # A skipped corrupt sample left an odd batch; mixup pairs samples, so one more sits out.
            images, labels = images[:-1], labels[:-1]
        images, labels = self.images_to_device(images), labels.to(self.device, non_blocking=True)
        if self.mixup is None:
            return images, labels
        return self.mixup(images, labels)

    def loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        images, targets = self.mixed_view(batch)
        logits = engine(images)
        return self.loss_fn(logits.float(), targets), len(images)

    @torch.no_grad()
    def evaluate(self, module, rank, world_size) -> dict:
        if not self.val_shards:
            return {}
        cfg = self.cfg
        loader = labelled_loader(self.val_shards, cfg.data, rank, world_size, seed=cfg.run.seed, training=False,
                                 batch_size=cfg.eval.batch_size_per_rank or cfg.data.batch_size_per_rank)
        totals = torch.zeros(4, dtype=torch.float64)  # samples, top1 hits, top5 hits, summed loss
        skipped: Counter = Counter()
        for item in loader:
            skipped.update(item.skips)
            if item.batch is None:
                continue
            images, labels = item.batch
            labels = self.val_labels.apply(labels).to(self.device)
            with autocast(self.device, self.amp):
                logits = module(self.images_to_device(images))
            hits = topk_correct(logits, labels)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            totals += torch.tensor([len(labels), hits[1], hits[5], float(loss)], dtype=torch.float64)
        totals = all_reduce_sum(totals, self.device)
        n = max(totals[0].item(), 1.0)
        # Every metric travels with its sample count; fewer than the shards list is a warning, never silent.
        scored, expected = int(totals[0].item()), sum(s.num_samples for s in self.val_shards)
        result = {"top1": totals[1].item() / n, "top5": totals[2].item() / n,  # fractions, as every stage's
                  "loss": totals[3].item() / n, "samples": scored, "expected_samples": expected}
        if scored != expected:  # identical on every rank (all-reduced), so the gather below is collective
            warning = sample_shortfall("validation", scored, expected, _summed_over_ranks(skipped),
                                       f"data.val ({cfg.data.val})")
            result["warnings"] = [warning]
            if rank == 0:
                print(f"[pretrain] warning: {warning}", flush=True)
        return result


def _summed_over_ranks(counts: Counter) -> dict[str, int]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counts)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(counts))
    return dict(sum((Counter(part) for part in parts), Counter()))
