"""Classification metrics shared by zero-shot, linear probe, classify and validation during training (the
one top-k count), defined as CLIP_benchmark defines them, so numbers are comparable with its published
tables. Every value is a fraction of samples."""
from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """k -> how many rows have their target among the k highest logits, for each k in `ks`.

    k above the number of classes is clamped to it, so every row counts as correct there: timm's
    `accuracy` rule (timm/utils/metrics.py). CLIP_benchmark never asks for that case: it writes acc5 as NaN
    below 5 classes, which classification_metrics mirrors with None."""
    k_max = min(max(ks), logits.shape[1])
    hits = logits.topk(k_max, dim=1).indices.eq(targets.view(-1, 1))
    return {k: int(hits[:, :min(k, k_max)].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k highest logits (topk_correct / rows)."""
    return topk_correct(logits, targets, (k,))[k] / len(targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """acc1, acc5 and mean_per_class_recall of (N, C) logits against (N,) integer targets.

    acc5 is None with fewer than 5 classes: CLIP_benchmark reports NaN there, which JSON cannot hold.
    mean_per_class_recall is sklearn's balanced accuracy (the mean over classes present in `targets`),
    exactly what CLIP_benchmark reports.
    """
    if len(targets) == 0:
        raise ValueError("no samples to score (every sample was skipped or the shards are empty)")
    logits, targets = logits.float().cpu(), targets.long().cpu()
    num_classes = logits.shape[1]
    if int(targets.max()) >= num_classes or int(targets.min()) < 0:
        raise ValueError(f"labels go up to {int(targets.max())} but the classifier has {num_classes} classes")
    recall = balanced_accuracy(targets.numpy(), logits.argmax(dim=1).numpy())
    acc5 = topk_accuracy(logits, targets, 5) if num_classes >= 5 else None
    return {"acc1": topk_accuracy(logits, targets, 1), "acc5": acc5, "mean_per_class_recall": float(recall)}


def balanced_accuracy(targets: np.ndarray, predictions: np.ndarray) -> float:
    """sklearn.metrics.balanced_accuracy_score, the same float64 operations in the same order (so the same
    bits): the recall of each class present in `targets`, in sorted class order, then np.mean. Restated
    because importing sklearn costs ~1 s of CPU per `launch eval` run, more than scoring takes."""
    classes, counts = np.unique(targets, return_counts=True)
    hits = np.bincount(targets[targets == predictions], minlength=int(classes.max()) + 1)[classes]
    return float(np.mean(hits / counts))


def json_safe(value: float | None) -> float | None:
    """NaN/inf -> None, so result files are strict JSON."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value
