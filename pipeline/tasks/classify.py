"""Image classification: cross-entropy (label smoothing) or BCE (ResNet strikes back), mixup/cutmix."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


class ClassifyTask:
    def __init__(self, optim_cfg, data_cfg, num_classes: int):
        self.num_classes = num_classes
        mixing = data_cfg.mixup_alpha > 0 or data_cfg.cutmix_alpha > 0
        self.mixup = Mixup(
            mixup_alpha=data_cfg.mixup_alpha, cutmix_alpha=data_cfg.cutmix_alpha, prob=data_cfg.mixup_prob,
            label_smoothing=optim_cfg.label_smoothing, num_classes=num_classes,
        ) if mixing else None
        if optim_cfg.loss == "bce":
            # Mixup already smooths the targets it makes; BCE smooths only hard targets.
            self.loss_fn = BinaryCrossEntropy(smoothing=0.0 if mixing else optim_cfg.label_smoothing)
        elif mixing:
            self.loss_fn = SoftTargetCrossEntropy()
        elif optim_cfg.label_smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(optim_cfg.label_smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()

    def __call__(self, model, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = self.loss_fn(logits.float(), targets)
        return loss, {}


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels[:, None])
    return {k: int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")
