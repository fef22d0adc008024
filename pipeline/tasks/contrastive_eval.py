"""Evaluation during contrastive training, through the evaluation stage's own functions.

  * zero-shot classification on each eval.zeroshot set (CLIP_benchmark layout): the stage's
    prompt/classifier/metrics code; each rank scores its share of the images and the logits are
    gathered, so every rank returns the same numbers;
  * on data.val image-text shards: the contrastive loss per validation batch (as open_clip_train's
    clip_val_loss) and image<->text retrieval recall@k over the whole validation set.

Both read through pipeline.data's evaluation stream, as `launch eval` does (each rank its share, every
sample once, skips counted by reason); this file gathers across ranks. Metric values are fractions, as `launch eval` writes them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.config import zeroshot_entry
from pipeline.data.eval_batches import labelled_batches
from pipeline.data.image_text import image_text_loader
from pipeline.data.labelled import eval_transform
from pipeline.data.shards import Shard
from pipeline.evaluation import datasets
from pipeline.evaluation.metrics import classification_metrics
from pipeline.evaluation.retrieval import recall_metrics
from pipeline.evaluation.runtime import SkipTally
from pipeline.evaluation.tasks import dataset_zero_shot_prompts
from pipeline.evaluation.zero_shot import build_zeroshot_head, predict
from pipeline.metrics import prefixed, zeroshot_prefix
from pipeline.precision import autocast
from pipeline.tasks.contrastive_loss import build_contrastive_loss, contrastive_loss

ZEROSHOT_SPLIT = "test"


def zeroshot_sets(entries: tuple[str, ...], check: bool = False) -> list[tuple[str, str]]:
    """eval.zeroshot entries ('NAME=PATH' or 'PATH') -> [(name, path)]; check=True looks for the shards."""
    sets = [zeroshot_entry(entry) for entry in entries]
    if check:
        for _, path in sets:
            datasets.find_shards(Path(path), ZEROSHOT_SPLIT)  # ValueError naming the folder
    return sets


def _all_gather(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    parts: list = [None] * world_size
    dist.all_gather_object(parts, value)
    return parts


def _skipped(counts) -> dict:
    return {"skipped_samples": dict(counts)} if counts else {}


def zero_shot(module, tokenizer: Callable, data_dir: str, data_cfg, batch_size: int, device: torch.device,
              amp: bool, rank: int, world_size: int) -> dict:
    classnames, templates, _ = dataset_zero_shot_prompts(Path(data_dir), ZEROSHOT_SPLIT)
    classifier = build_zeroshot_head(module, tokenizer, classnames, templates, device, amp=amp)
    batches = labelled_batches(datasets.split_shards(Path(data_dir), ZEROSHOT_SPLIT), eval_transform(data_cfg),
                               batch_size, data_cfg.num_workers_per_rank, rank, world_size)
    tally = SkipTally()
    try:
        logits, targets = predict(module, classifier, batches, device, tally, amp=amp)
    except ValueError:
        if tally.num_samples:
            raise
        # This rank's share of a tiny set was empty (or all skipped): it still joins the gather.
        logits, targets = torch.empty(0, classifier.shape[1]), torch.empty(0, dtype=torch.long)
    # Logits are samples x classes floats: small next to the images each rank already decoded.
    parts = _all_gather((logits, targets, tally.counts), world_size)
    metrics = classification_metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    skipped = sum((p[2] for p in parts), start=Counter())
    return {**metrics, "samples": sum(len(p[1]) for p in parts), **_skipped(skipped)}


def val_contrastive(module, tokenizer: Callable, sources: list[list[Shard]], data_cfg, contrastive_cfg,
                    batch_size: int, device: torch.device, amp: bool, rank: int, world_size: int,
                    seed: int) -> dict:
    """Contrastive loss per validation batch and retrieval recalls over the gathered embeddings."""
    loss_fn = build_contrastive_loss(contrastive_cfg, rank=0, world_size=1)  # within one batch
    loader = image_text_loader(sources, data_cfg, tokenizer, rank, world_size, seed=seed, training=False,
                               batch_size=batch_size)
    images, texts, skipped = [], [], Counter()
    loss_sum = torch.zeros(2, dtype=torch.float64)  # sum of per-sample losses, samples
    for item in loader:
        skipped.update(item.skips)
        if item.batch is None:
            continue
        pixels, tokens = item.batch
        with autocast(device, amp):
            outputs = module(pixels.to(device), tokens.to(device))
        loss = contrastive_loss(loss_fn, outputs)
        loss_sum += torch.tensor([loss.item() * len(tokens), len(tokens)], dtype=torch.float64)
        images.append(outputs["image_features"].float().cpu())
        texts.append(outputs["text_features"].float().cpu())
    local = (torch.cat(images) if images else torch.empty(0), torch.cat(texts) if texts else torch.empty(0),
             loss_sum, skipped)
    parts = _all_gather(local, world_size)
    image_embeddings = torch.cat([p[0] for p in parts if len(p[0])])
    text_embeddings = torch.cat([p[1] for p in parts if len(p[1])])
    totals = sum(p[2] for p in parts)
    # One caption per image in training shards: text i belongs to image i.
    recalls = recall_metrics(image_embeddings, text_embeddings, torch.arange(len(text_embeddings)))
    skipped = sum((p[3] for p in parts), start=Counter())
    return {"loss": totals[0].item() / max(totals[1].item(), 1.0), **recalls,
            "samples": int(totals[1].item()), **_skipped(skipped)}


def evaluate_contrastive(module, tokenizer: Callable, data_cfg, eval_cfg, contrastive_cfg,
                         val_sources: list[list[Shard]], device: torch.device, amp: bool, rank: int,
                         world_size: int, seed: int) -> dict:
    """Every metric of one evaluation, identical on every rank, named as inside val/ (the trainer prefixes
    them): loss, retrieval recalls and samples of data.val; zeroshot/<set>/acc1 ... per zero-shot set."""
    batch_size = eval_cfg.batch_size_per_rank or data_cfg.batch_size_per_rank
    results: dict = {}
    if val_sources:
        results.update(val_contrastive(module, tokenizer, val_sources, data_cfg, contrastive_cfg, batch_size,
                                       device, amp, rank, world_size, seed))
    for name, path in zeroshot_sets(eval_cfg.zeroshot):
        metrics = zero_shot(module, tokenizer, path, data_cfg, batch_size, device, amp, rank, world_size)
        results.update(prefixed(zeroshot_prefix(name), metrics))
    return results
