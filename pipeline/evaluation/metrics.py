"""Classification metrics shared by zero-shot, linear probe and classify, defined as CLIP_benchmark
defines them, so numbers are comparable with its published tables."""
from __future__ import annotations

import math
import warnings

import torch
from sklearn.metrics import balanced_accuracy_score


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k highest logits."""
    topk = logits.topk(k, dim=1).indices
    return (topk == targets.view(-1, 1)).any(dim=1).double().mean().item()


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
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected on small or unbalanced eval sets.
        warnings.simplefilter("ignore", UserWarning)
        recall = balanced_accuracy_score(targets.numpy(), logits.argmax(dim=1).numpy())
    acc5 = topk_accuracy(logits, targets, 5) if num_classes >= 5 else None
    return {"acc1": topk_accuracy(logits, targets, 1), "acc5": acc5, "mean_per_class_recall": float(recall)}


def json_safe(value: float | None) -> float | None:
    """NaN/inf -> None, so result files are strict JSON."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value
