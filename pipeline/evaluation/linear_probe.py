"""Linear probe on frozen image features, by one of two methods (the result names the one used):

* 'logistic_regression' (default): scikit-learn L-BFGS logistic regression, as the CLIP paper probes.
  The regularisation strength C is chosen on a held-out part of the training features, then the probe is
  refitted on all training features with that C and scored on the test split. Features are standardised
  with the training set's mean and std first, so one C grid suits normalised CLIP embeddings and raw
  classifier pre-logits alike (and L-BFGS converges in a fraction of the iterations).
* 'clip_benchmark': CLIP_benchmark's metrics/linear_probe.py, so numbers compare with its tables
  (pipeline.evaluation.linear_probe_adamw).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline import families
from pipeline.data.stream import StreamBatch
from pipeline.evaluation.metrics import classification_metrics
from pipeline.evaluation.runtime import SkipTally
from pipeline.precision import autocast

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

# scikit-learn is imported where a probe is fitted: every `launch eval` imports this module (probe_method
# checks --method), and the import costs ~1 s of CPU that zero-shot and retrieval never use.

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 4, 8))


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    kind: str,
    batches: Iterable[StreamBatch],
    device: torch.device,
    tally: SkipTally,
    desc: str,
    total: int | None = None,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int64) of every labelled batch: the image features of the model's
    family (pipeline.families, `features`)."""
    featurize = families.get(kind).features
    features, labels, keys = [], [], []
    for batch in tally.track(batches, desc, total):
        with autocast(device, amp):
            features.append(featurize(model, batch.images.to(device)).float().cpu())
        labels.append(batch.labels)
        keys.extend(batch.keys)
    if not features:
        raise ValueError(f"{desc}: no samples (every sample was skipped or the shards are empty)")
    # Sample order decides the held-out split; loader workers interleave batches, so fix the order.
    order = np.argsort(np.array(keys), kind="stable")
    return torch.cat(features).numpy()[order], torch.cat(labels).numpy()[order]


def _fit(probe: LogisticRegression, features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these L-BFGS steps are small matrix products, and on a busy machine BLAS worker
    # threads spin against other processes (measured: 10x slower on 2 loaded cores with 2 threads).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Large C on separable features never fully converges; the sweep still ranks it fairly.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.set_params(C=c).fit(features, labels)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    # Label-free statistics of the training features: nothing about the held-out labels leaks.
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def _logits(probe: LogisticRegression, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """Decision scores in the full label space; classes absent from training can never be predicted."""
    scores = probe.decision_function(features)
    if scores.ndim == 1:  # binary problems give one score column: class 1 vs class 0
        scores = np.stack([-scores, scores], axis=1)
    full = np.full((len(features), num_classes), -np.inf, dtype=np.float64)
    full[:, probe.classes_] = scores
    return torch.from_numpy(full)


def _holdout_split(labels: np.ndarray, val_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

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
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(train_labels)) < 2:
        raise ValueError("linear probe: the training split has fewer than two classes")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_features, test_features = _standardise(train_features, test_features)
    fit_idx, val_idx = _holdout_split(train_labels, val_fraction, seed)
    val_acc = {}
    # Weak to strong C, each fit starting from the previous solution: the sweep costs about one fit.
    sweep = LogisticRegression(max_iter=1000, random_state=seed, warm_start=True)
    for c in tqdm(sorted(cs), desc="probe C sweep", unit="fit"):
        _fit(sweep, train_features[fit_idx], train_labels[fit_idx], c)
        logits = _logits(sweep, train_features[val_idx], num_classes)
        val_acc[c] = classification_metrics(logits, torch.from_numpy(train_labels[val_idx]))["acc1"]
    # Ties go to the strongest regularisation (smallest C): the simpler probe.
    best_c = max(cs, key=lambda c: (val_acc[c], -c))
    probe = _fit(LogisticRegression(max_iter=1000, random_state=seed), train_features, train_labels, best_c)
    metrics = classification_metrics(_logits(probe, test_features, num_classes), torch.from_numpy(test_labels))
    return {**metrics, "regularization_C": best_c, "val_acc1": val_acc[best_c],
            "num_train": int(len(train_labels)), "num_test": int(len(test_labels))}


def _logistic_regression(train_x, train_y, test_x, test_y, *, seed: int, device, batch_size: int) -> dict:
    return {"method": "logistic_regression", **fit_and_score(train_x, train_y, test_x, test_y, seed=seed)}


def _clip_benchmark(train_x, train_y, test_x, test_y, *, seed: int, device, batch_size: int) -> dict:
    from pipeline.evaluation.linear_probe_adamw import fit_and_score_adamw

    return {"method": "clip_benchmark",
            **fit_and_score_adamw(train_x, train_y, test_x, test_y, batch_size=batch_size, seed=seed, device=device)}


PROBE_METHODS: dict[str, Callable[..., dict]] = {
    "logistic_regression": _logistic_regression,
    "clip_benchmark": _clip_benchmark,
}
DEFAULT_METHOD = "logistic_regression"


def probe_method(name: str) -> Callable[..., dict]:
    if name not in PROBE_METHODS:
        raise ValueError(f"linear probe: unknown method {name!r} (valid: {', '.join(PROBE_METHODS)})")
    return PROBE_METHODS[name]


def evaluate_linear_probe(
    model: torch.nn.Module,
    kind: str,
    train_batches: Iterable[StreamBatch],
    test_batches: Iterable[StreamBatch],
    device: torch.device,
    method: str = DEFAULT_METHOD,
    batch_size: int = 64,
    seed: int = 0,
    amp: bool = False,
) -> dict:
    """Features of both splits, then the probe `method` (PROBE_METHODS); also reports skipped samples.

    `batch_size` is the probe's own minibatch where the method has one (clip_benchmark: as CLIP_benchmark,
    the same --batch_size that extracts the features)."""
    fit = probe_method(method)
    train_tally, test_tally = SkipTally(), SkipTally()
    train_x, train_y = extract_features(model, kind, train_batches, device, train_tally, "train features", amp=amp)
    test_x, test_y = extract_features(model, kind, test_batches, device, test_tally, "test features", amp=amp)
    metrics = fit(train_x, train_y, test_x, test_y, seed=seed, device=device, batch_size=batch_size)
    skipped = train_tally.counts + test_tally.counts
    return {**metrics, "num_samples": test_tally.num_samples, "num_skipped": dict(sorted(skipped.items()))}
