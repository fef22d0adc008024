"""Contrastive image-text pretraining (model.kind: clip): open_clip CLIP / SigLIP models on image-text
shards, trained by the shared loop with open_clip's losses across ranks.

Effective contrastive batch: each micro-batch's loss covers the global micro-batch
(data.batch_size_per_rank x ray.num_workers) because features are gathered across ranks;
gradient accumulation sums gradients of separate micro-batch losses, so it multiplies the samples per
optimizer step, not the negatives each sample sees (see pipeline.tasks.contrastive_loss).
"""
from __future__ import annotations


import torch

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.data.image_text import image_text_loader
from pipeline.data.shards import resolve_shards
from pipeline.models.clip import check_clip_name, clip_embed_dim, get_tokenizer
from pipeline.tasks.base import Task, all_reduce_sum
from pipeline.tasks.contrastive_eval import evaluate_contrastive, zeroshot_sets
from pipeline.tasks.contrastive_loss import MatryoshkaLoss, build_contrastive_loss, contrastive_loss


def split_sources(spec: str) -> list[list]:
    """'a::b' -> the shards of each source, in order (data.train_weights pairs with them)."""
    return [resolve_shards(part) for part in (p.strip() for p in spec.split("::")) if part]


class ContrastiveTask(Task):
    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.tokenizer = get_tokenizer(cfg.model.name)
        self.train_sources = split_sources(cfg.data.train)
        self.val_sources = split_sources(cfg.data.val) if cfg.data.val else []
        self.loss_fn = build_contrastive_loss(cfg.contrastive)
        self.width_loss_sums: dict[int, torch.Tensor] = {}  # Matryoshka: width -> loss summed since the last log row
        self.width_loss_calls = 0

    @classmethod
    def check(cls, cfg: Config) -> None:
        try:
            check_clip_name(cfg.model.name)
        except ValueError as err:
            raise ConfigError("model.name", str(err).removeprefix("model.name: ")) from None
        check_matryoshka_dims(cfg.contrastive.matryoshka_dims, clip_embed_dim(cfg.model.name), cfg.model.name)
        if cfg.model.pretrained_path:
            check_weights_file(cfg.model.pretrained_path)
        try:
            zeroshot_sets(cfg.eval.zeroshot, check=True)
        except ValueError as err:
            raise ConfigError("eval.zeroshot", str(err)) from None

    def train_batches(self, rank, world_size, start):
        cfg = self.cfg
        return iter(image_text_loader(self.train_sources, cfg.data, self.tokenizer, rank, world_size,
                                      seed=cfg.run.seed, training=True, batch_size=cfg.data.batch_size_per_rank,
                                      weights=cfg.data.train_weights, start=start))

    def loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        images, texts = batch
        images, texts = self.images_to_device(images), texts.to(self.device, non_blocking=True)
        outputs = engine(images, texts)  # bf16 autocast, when on, is DeepSpeed's (engine.torch_autocast)
        loss = contrastive_loss(self.loss_fn, outputs)
        if isinstance(self.loss_fn, MatryoshkaLoss):  # device-side sums: no host sync per step
            for width, value in self.loss_fn.last_losses.items():
                self.width_loss_sums[width] = self.width_loss_sums.get(width, 0.0) + value
            self.width_loss_calls += 1
        return loss, len(texts)

    def window_metrics(self) -> dict:
        """Matryoshka: each width's own loss (unweighted), as train/matryoshka/<width>/loss."""
        if not isinstance(self.loss_fn, MatryoshkaLoss):
            return {}
        widths = sorted(self.width_loss_sums, reverse=True)
        values = torch.stack([self.width_loss_sums[w].double() for w in widths]
                             + [torch.tensor(float(self.width_loss_calls), dtype=torch.float64, device=self.device)])
        totals = all_reduce_sum(values, self.device).tolist()
        self.width_loss_sums, self.width_loss_calls = {}, 0
        return {f"matryoshka/{w}/loss": total / max(totals[-1], 1.0) for w, total in zip(widths, totals)}

    @torch.no_grad()
    def evaluate(self, module, rank, world_size) -> dict:
        cfg = self.cfg
        return evaluate_contrastive(
            module, self.tokenizer, cfg.data, cfg.eval, cfg.contrastive, self.val_sources, self.device,
            self.amp, rank, world_size, seed=cfg.run.seed,
        )


def check_matryoshka_dims(dims: tuple[int, ...], embed_dim: int, name: str) -> None:
    """Every Matryoshka width is a proper prefix of the model's embedding (the full width is always trained)."""
    too_wide = [d for d in dims if d >= embed_dim]
    if too_wide:
        raise ConfigError("contrastive.matryoshka_dims", f"{too_wide} not below {name}'s embedding width "
                          f"{embed_dim} (the full width is always included)")


def check_weights_file(path: str) -> None:
    """model.pretrained_path names a file (local or in a bucket): one line naming the key when it does not."""
    try:
        storage.check_reachable(path, "model.pretrained_path")
        found = storage.is_file(path)
    except storage.StorageError as err:
        raise ConfigError("model.pretrained_path", str(err).removeprefix("model.pretrained_path: ")) from None
    if not found:
        raise ConfigError("model.pretrained_path", f"{path}: no such weights file")
