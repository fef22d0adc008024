"""Zero-shot classification: class names x prompt templates -> text classifier -> top-k accuracy.

The classifier is built the way open_clip's `build_zero_shot_classifier` and CLIP_benchmark's
`zero_shot_classifier` build it: each prompt's text embedding is L2-normalised, the prompts of a class
are averaged, and the mean is normalised again. Logits are 100 * normalised image features @ W.
With `embed_dim` (Matryoshka, `launch eval zeroshot --embed-dim D`) image and prompt embeddings keep their
first D dims before each normalisation.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from tqdm import tqdm

from pipeline.data.stream import StreamBatch
from pipeline.evaluation.metrics import classification_metrics
from pipeline.evaluation.runtime import SkipTally
from pipeline.models.clip import normalized_prefix
from pipeline.precision import autocast

# A template is a str with a `{c}` placeholder (CLIP_benchmark's files) or a callable (open_clip's).
Template = Union[str, Callable[[str], str]]
Tokenizer = Callable[[list[str]], torch.Tensor]

# CLIP's logit scale for zero-shot evaluation: it only matters for ties and for the logits' range.
LOGIT_SCALE = 100.0

DEFAULT_CLASSNAMES: dict[str, Sequence[str]] = {"imagenet": IMAGENET_CLASSNAMES}
DEFAULT_TEMPLATES: dict[str, Sequence[Template]] = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES}


def render_prompts(classname: str, templates: Sequence[Template]) -> list[str]:
    return [t.format(c=classname) if isinstance(t, str) else t(classname) for t in templates]


@torch.no_grad()
def build_zeroshot_head(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device,
    prompts_per_forward: int = 1024,
    amp: bool = False,
    embed_dim: int | None = None,
) -> torch.Tensor:
    """Zero-shot weights, shape (embed_dim, num_classes), one normalised column per class; embed_dim None =
    the model's full width."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    num_templates = len(templates)
    # Whole classes per forward, so one class's prompts are never split across two batches.
    classes_per_forward = max(1, prompts_per_forward // num_templates)
    columns = []
    for start in tqdm(range(0, len(classnames), classes_per_forward), desc="classifier", unit="batch"):
        names = classnames[start:start + classes_per_forward]
        texts = [prompt for name in names for prompt in render_prompts(name, templates)]
        with autocast(device, amp):
            embeddings = model.encode_text(tokenizer(texts).to(device)).float()
        embeddings = normalized_prefix(embeddings, embed_dim).view(len(names), num_templates, -1).mean(dim=1)
        columns.append(F.normalize(embeddings, dim=-1))
    return torch.cat(columns).T.contiguous()


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    batches: Iterable[StreamBatch],
    device: torch.device,
    tally: SkipTally,
    total: int | None = None,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) over every labelled batch; image features keep the classifier's width (its rows)."""
    logits, targets = [], []
    for batch in tally.track(batches, "zero-shot", total):
        with autocast(device, amp):
            features = model.encode_image(batch.images.to(device)).float()
        logits.append((LOGIT_SCALE * normalized_prefix(features, classifier.shape[0]) @ classifier).cpu())
        targets.append(batch.labels)
    if not logits:
        raise ValueError("no samples to score (every sample was skipped or the shards are empty)")
    return torch.cat(logits), torch.cat(targets)


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: Iterable[StreamBatch],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device,
    total: int | None = None,
    amp: bool = False,
    embed_dim: int | None = None,
) -> dict:
    """acc1, acc5, mean_per_class_recall plus sample counts and the embedding width scored (embed_dim)."""
    # Start the loader first: its workers decode the first batches while the text tower builds the head.
    batches = iter(batches)
    classifier = build_zeroshot_head(model, tokenizer, classnames, templates, device, amp=amp, embed_dim=embed_dim)
    tally = SkipTally()
    logits, targets = predict(model, classifier, batches, device, tally, total, amp)
    return {**classification_metrics(logits, targets), **tally.summary(), "embed_dim": classifier.shape[0]}
