"""CLIP_benchmark's linear probe (clip_benchmark/metrics/linear_probe.py), restated on feature arrays so
our numbers compare with its tables. `launch eval linear-probe --method clip_benchmark` selects it.

What CLIP_benchmark does, and so what this does:
  * features L2-normalised (its Featurizer's default, normalize=True);
  * a validation split of the training features: a random 20% (its --val_proportion 0.2, used when the
    dataset brings no validation split; the sizes of torch's random_split: floor(0.2 n) for validation);
  * for each weight decay tried: torch.manual_seed(seed), a fresh nn.Linear, AdamW(lr 0.1, that weight
    decay), cross-entropy, 10 epochs of shuffled minibatches of --batch_size (64), the lr set before every
    step on a cosine from lr to 0 without warmup (its cosine_lr(optimizer, lr, 0, epochs * len(loader)));
  * the weight decay searched on np.logspace(-6, 2, 97): first at its 7 points logspace(-6, 2, 7), then
    around the best with spans of 8, 4, 2 and 1 grid points (its tune_weight_decay / find_peak: the best is
    the first strictly higher validation top-1 in the order tried, starting from grid point 0 at 0%);
  * the probe retrained with that weight decay on train + validation, scored on test.
The one departure: the output layer has a column for every label seen in train or test (CLIP_benchmark
sizes it from the training labels), so a test label the training split lacks is scored as wrong, not
an error. Probes train in fp32.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.evaluation.metrics import classification_metrics

WEIGHT_DECAYS: tuple[float, ...] = tuple(float(w) for w in np.logspace(-6, 2, num=97))
FIRST_INDICES: tuple[int, ...] = tuple(range(0, 97, 16))  # where logspace(-6, 2, 7) sits in WEIGHT_DECAYS
LR, EPOCHS, VAL_PROPORTION = 0.1, 10, 0.2  # CLIP_benchmark's --fewshot_lr, --fewshot_epochs, --val_proportion


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, *,
                lr: float = LR, epochs: int = EPOCHS, batch_size: int = 64, seed: int = 0,
                device: torch.device | str = "cpu") -> torch.nn.Linear:
    """One probe: nn.Linear + AdamW + cross-entropy, cosine lr per step; the same init and order per seed."""
    features, labels = features.to(device), labels.to(device)
    with torch.random.fork_rng(devices=[]):  # CLIP_benchmark seeds the global RNG; ours stays untouched
        torch.manual_seed(seed)
        probe = torch.nn.Linear(features.shape[1], num_classes)
    probe = probe.to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(len(labels) / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=order_rng).to(device)
        for start in range(0, len(labels), batch_size):
            rows = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total_steps)) * lr
            loss = F.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe


@torch.no_grad()
def probe_logits(probe: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return probe(features.to(probe.weight.device)).float().cpu()


def find_peak(indices: Sequence[int], val_acc1: Callable[[int], float]) -> int:
    """CLIP_benchmark's find_peak: the first index whose accuracy beats every earlier one (and 0)."""
    best, best_acc = 0, 0.0
    for index in indices:
        acc = val_acc1(index)
        if best_acc < acc:
            best, best_acc = index, acc
    return best


def tune_weight_decay(val_acc1: Callable[[int], float]) -> int:
    """CLIP_benchmark's tune_weight_decay: 7 coarse points, then spans of 8, 4, 2, 1 around the peak."""
    peak = find_peak(FIRST_INDICES, val_acc1)
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(WEIGHT_DECAYS) - 1)
        peak = find_peak([left, peak, right], val_acc1)
        span //= 2
    return peak


def fit_and_score_adamw(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                        test_labels: np.ndarray, *, batch_size: int = 64, seed: int = 0, lr: float = LR,
                        epochs: int = EPOCHS, val_proportion: float = VAL_PROPORTION,
                        device: torch.device | str | None = None) -> dict:
    """Weight decay tuned on a random validation split, probe retrained on train + validation, test scored."""
    device = device or "cpu"
    x = F.normalize(torch.from_numpy(np.asarray(train_features, dtype=np.float32)), dim=-1)
    y = torch.from_numpy(np.asarray(train_labels)).long()
    test_x = F.normalize(torch.from_numpy(np.asarray(test_features, dtype=np.float32)), dim=-1)
    test_y = torch.from_numpy(np.asarray(test_labels)).long()
    num_val = int(math.floor(val_proportion * len(y)))
    if num_val < 1 or num_val == len(y):
        raise ValueError(f"linear probe (clip_benchmark): {len(y)} training samples cannot give a "
                         f"{val_proportion:.0%} validation split and a training part")
    num_classes = int(max(y.max(), test_y.max())) + 1
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    fit_rows, val_rows = permutation[num_val:], permutation[:num_val]
    options = dict(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    accuracies: dict[int, float] = {}  # each probe is deterministic: the peak re-tried in a round is reused
    progress = tqdm(desc="probe weight-decay sweep", unit="fit")

    def val_acc1(index: int) -> float:
        if index not in accuracies:
            probe = train_probe(x[fit_rows], y[fit_rows], num_classes, WEIGHT_DECAYS[index], **options)
            accuracies[index] = classification_metrics(probe_logits(probe, x[val_rows]), y[val_rows])["acc1"]
            progress.update()
        return accuracies[index]

    best = tune_weight_decay(val_acc1)
    progress.close()
    probe = train_probe(x, y, num_classes, WEIGHT_DECAYS[best], **options)
    metrics = classification_metrics(probe_logits(probe, test_x), test_y)
    return {**metrics, "weight_decay": WEIGHT_DECAYS[best], "val_acc1": accuracies[best], "lr": lr,
            "epochs": epochs, "batch_size": batch_size, "val_proportion": val_proportion, "seed": seed,
            "num_train": int(len(y)), "num_val": num_val, "num_test": int(len(test_y))}
