"""Linear probe: logistic regression on frozen image features.

The regularisation strength C is chosen on a held-out part of the training features (as in the CLIP
paper's sweep; CLIP_benchmark sweeps weight decay the same way), then the probe is refitted on all
training features with that C and scored on the test split.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from pipeline.evaluation.datasets import Batch
from pipeline.evaluation.metrics import classification_metrics
from pipeline.evaluation.runtime import SkipTally, autocast

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 4, 8))


def _clip_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # CLIP_benchmark probes the L2-normalised embedding, the space zero-shot also uses.
    return F.normalize(model.encode_image(images).float(), dim=-1)


def _classifier_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # timm's pre-logits: the pooled features the classifier head sees.
    return model.forward_head(model.forward_features(images), pre_logits=True).float()


FEATURIZERS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "clip": _clip_features,
    "classifier": _classifier_features,
}


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    kind: str,
    batches: Iterable[Batch],
    device: torch.device,
    tally: SkipTally,
    desc: str,
    total: int | None = None,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int64) of every labelled batch."""
    if kind not in FEATURIZERS:
        raise ValueError(f"no feature extractor for model kind {kind!r} (valid: {', '.join(FEATURIZERS)})")
    featurize = FEATURIZERS[kind]
    features, labels = [], []
    for batch in tally.track(batches, desc, total):
        with autocast(device, amp):
            features.append(featurize(model, batch.images.to(device)).float().cpu())
        labels.append(batch.labels)
    if not features:
        raise ValueError(f"{desc}: no samples (every sample was skipped or the shards are empty)")
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def _fit(features: np.ndarray, labels: np.ndarray, c: float, seed: int) -> LogisticRegression:
    probe = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        # Large C on separable features never fully converges; the sweep still ranks it fairly.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.fit(features, labels)


def _logits(probe: LogisticRegression, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """Decision scores in the full label space; classes absent from training can never be predicted."""
    scores = probe.decision_function(features)
    if scores.ndim == 1:  # binary problems give one score column: class 1 vs class 0
        scores = np.stack([-scores, scores], axis=1)
    full = np.full((len(features), num_classes), -np.inf, dtype=np.float64)
    full[:, probe.classes_] = scores
    return torch.from_numpy(full)


def _holdout_split(labels: np.ndarray, val_fraction: float, seed: int):
    indices = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    # Stratify when every class can give one sample to each side; tiny sets fall back to random.
    stratify = labels if counts.min() >= 2 else None
    return train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=stratify)


def fit_and_score(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Sweep C on a held-out split of the training features, refit on all of them, score on test."""
    if len(np.unique(train_labels)) < 2:
        raise ValueError("linear probe: the training split has fewer than two classes")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit_idx, val_idx = _holdout_split(train_labels, val_fraction, seed)
    val_acc = {}
    for c in tqdm(cs, desc="probe C sweep", unit="fit"):
        probe = _fit(train_features[fit_idx], train_labels[fit_idx], c, seed)
        logits = _logits(probe, train_features[val_idx], num_classes)
        val_acc[c] = classification_metrics(logits, torch.from_numpy(train_labels[val_idx]))["acc1"]
    # Ties go to the strongest regularisation (smallest C): the simpler probe.
    best_c = max(cs, key=lambda c: (val_acc[c], -c))
    probe = _fit(train_features, train_labels, best_c, seed)
    metrics = classification_metrics(_logits(probe, test_features, num_classes), torch.from_numpy(test_labels))
    return {**metrics, "regularization_C": best_c, "val_acc1": val_acc[best_c],
            "num_train": int(len(train_labels)), "num_test": int(len(test_labels))}


def evaluate_linear_probe(
    model: torch.nn.Module,
    kind: str,
    train_batches: Iterable[Batch],
    test_batches: Iterable[Batch],
    device: torch.device,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    amp: bool = False,
) -> dict:
    """Features of both splits, then `fit_and_score`; also reports skipped samples of both splits."""
    train_tally, test_tally = SkipTally(), SkipTally()
    train_x, train_y = extract_features(model, kind, train_batches, device, train_tally, "train features", amp=amp)
    test_x, test_y = extract_features(model, kind, test_batches, device, test_tally, "test features", amp=amp)
    metrics = fit_and_score(train_x, train_y, test_x, test_y, cs, val_fraction, seed)
    skipped = train_tally.counts + test_tally.counts
    return {**metrics, "num_samples": test_tally.num_samples, "num_skipped": dict(sorted(skipped.items()))}
