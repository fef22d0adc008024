"""Top-1 / top-5 of a classifier on labelled shards (the label of shard sample i is a class index of
the classifier's head, as our data-prep and timm's ImageNet shards both store it)."""
from __future__ import annotations

from typing import Iterable

import torch

from pipeline.data.stream import StreamBatch
from pipeline.evaluation.metrics import classification_metrics
from pipeline.evaluation.runtime import SkipTally
from pipeline.precision import autocast


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    batches: Iterable[StreamBatch],
    device: torch.device,
    total: int | None = None,
    amp: bool = False,
) -> dict:
    """acc1, acc5, mean_per_class_recall of model(images) logits, plus sample counts."""
    tally = SkipTally()
    logits, targets = [], []
    for batch in tally.track(batches, "classify", total):
        with autocast(device, amp):
            logits.append(model(batch.images.to(device)).float().cpu())
        targets.append(batch.labels)
    if not logits:
        raise ValueError("no samples to score (every sample was skipped or the shards are empty)")
    return {**classification_metrics(torch.cat(logits), torch.cat(targets)), **tally.summary()}
