"""Zero-shot image-text retrieval with several captions per image, scored as CLIP_benchmark does.

recall@k is the CLIP-paper definition: a query counts as a hit when at least one of its positives is
among its k best-scoring candidates. Text->image queries ("image_retrieval") have one positive each;
image->text queries ("text_retrieval") have every caption of that image as positives.
With `embed_dim` (Matryoshka, `launch eval retrieval --embed-dim D`) both towers' embeddings keep their first
D dims before normalisation.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from pipeline.data.stream import StreamBatch
from pipeline.evaluation.runtime import SkipTally
from pipeline.evaluation.zero_shot import Tokenizer
from pipeline.models.clip import normalized_prefix
from pipeline.precision import autocast

RECALL_KS = (1, 5, 10)
# Queries scored per chunk: bounds the (queries x candidates) score block held at once.
_QUERY_CHUNK = 1024


def hits_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) bool: does any of query q's top-k candidates (by `scores`, shape (Q, G)) lie in `positives`?"""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return positives.gather(1, top).any(dim=1)


def recall_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Retrieval recalls from normalised embeddings; text_to_image[t] is the index of caption t's image."""
    num_images = len(image_embeddings)
    metrics: dict[str, float] = {}
    for k in ks:
        image_hits, text_hits = [], []
        for start in range(0, len(text_embeddings), _QUERY_CHUNK):
            scores = text_embeddings[start:start + _QUERY_CHUNK] @ image_embeddings.T
            owners = text_to_image[start:start + _QUERY_CHUNK]
            positives = F.one_hot(owners, num_images).bool()
            image_hits.append(hits_at_k(scores, positives, k))
        for start in range(0, num_images, _QUERY_CHUNK):
            scores = image_embeddings[start:start + _QUERY_CHUNK] @ text_embeddings.T
            image_ids = torch.arange(start, min(start + _QUERY_CHUNK, num_images))
            positives = image_ids.view(-1, 1) == text_to_image.view(1, -1)
            text_hits.append(hits_at_k(scores, positives, k))
        metrics[f"image_retrieval_recall@{k}"] = torch.cat(image_hits).double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = torch.cat(text_hits).double().mean().item()
    return metrics


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: Iterable[StreamBatch],
    device: torch.device,
    tally: SkipTally,
    total: int | None = None,
    amp: bool = False,
    embed_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings, text embeddings, text_to_image), all normalised and on the CPU; embeddings cut to
    their first embed_dim dims first (None: full width)."""
    images, texts, owners = [], [], []
    num_images = 0
    for batch in tally.track(batches, "retrieval", total):
        flat = [caption for captions in batch.captions for caption in captions]
        with autocast(device, amp):
            image_features = model.encode_image(batch.images.to(device)).float()
            text_features = model.encode_text(tokenizer(flat).to(device)).float()
        images.append(normalized_prefix(image_features, embed_dim).cpu())
        texts.append(normalized_prefix(text_features, embed_dim).cpu())
        owners.extend(num_images + i for i, captions in enumerate(batch.captions) for _ in captions)
        num_images += len(batch.captions)
    if not images:
        raise ValueError("no samples to score (every sample was skipped or the shards are empty)")
    return torch.cat(images), torch.cat(texts), torch.tensor(owners, dtype=torch.long)


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: Iterable[StreamBatch],
    device: torch.device,
    ks: Sequence[int] = RECALL_KS,
    total: int | None = None,
    amp: bool = False,
    embed_dim: int | None = None,
) -> dict:
    """image_retrieval_recall@k and text_retrieval_recall@k for each k, plus sample counts and the embedding
    width scored (embed_dim)."""
    tally = SkipTally()
    image_embeddings, text_embeddings, owners = embed(model, tokenizer, batches, device, tally, total, amp,
                                                      embed_dim)
    metrics = recall_metrics(image_embeddings, text_embeddings, owners, ks)
    return {**metrics, "num_captions": len(owners), **tally.summary(), "embed_dim": image_embeddings.shape[1]}
