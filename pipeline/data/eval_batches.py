"""Batches the evaluators score (pipeline.evaluation): labelled or captioned images from any shards.

Read like every other evaluation through stream.EvalStream and reader.py, so each sample is scored exactly
once across ranks and a skipped one is counted under the same reason (pipeline.data.reasons) as in
training. Where the shards come from (CLIP_benchmark folders, data-prep output) is
pipeline.evaluation.datasets' business.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.data.image_text import read_captions
from pipeline.data.labelled import DecodeLabelled
from pipeline.data.reader import decode_image
from pipeline.data.shards import Shard
from pipeline.data.stream import EvalStream, eval_loader

Transform = Callable[[Any], torch.Tensor]


@dataclass
class Batch:
    """Decoded evaluation samples: images with integer labels (classification) or captions (retrieval)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[list[str]] | None = None
    keys: list[str] = field(default_factory=list)
    """'shard name/key' of each row: order-sensitive evaluators (the linear probe's held-out split) sort by
    it, so results do not depend on how batches were dealt to ranks and loader workers."""


class DecodeCaptioned:
    """Picklable decode function: raw sample -> (image tensor, its captions)."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def __call__(self, raw: dict) -> tuple[torch.Tensor, list[str]]:
        captions = read_captions(raw)  # checked first: a captionless sample is not worth decoding
        return self.transform(decode_image(raw)), captions


class Keyed:
    """raw sample -> ('shard name/key', *decode(raw))."""

    def __init__(self, decode: Callable[[dict], tuple]):
        self.decode = decode

    def __call__(self, raw: dict) -> tuple:
        return (f"{posixpath.basename(raw['__url__'])}/{raw['__key__']}", *self.decode(raw))


def collate_labelled(items: list[tuple[str, torch.Tensor, int]]) -> Batch:
    return Batch(images=torch.stack([image for _, image, _ in items]),
                 labels=torch.tensor([label for _, _, label in items], dtype=torch.long),
                 keys=[key for key, _, _ in items])


def collate_captioned(items: list[tuple[str, torch.Tensor, list[str]]]) -> Batch:
    return Batch(images=torch.stack([image for _, image, _ in items]),
                 captions=[captions for _, _, captions in items], keys=[key for key, _, _ in items])


def labelled_batches(shards: list[Shard], transform: Transform, batch_size: int, num_workers: int,
                     rank: int = 0, world_size: int = 1):
    """StreamBatches of Batch(images, labels, keys): this rank's share of every labelled sample, once."""
    stream = EvalStream(shards, rank, world_size, batch_size, Keyed(DecodeLabelled(transform)), collate_labelled)
    return eval_loader(stream, num_workers)


def captioned_batches(shards: list[Shard], transform: Transform, batch_size: int, num_workers: int,
                      rank: int = 0, world_size: int = 1):
    """StreamBatches of Batch(images, captions, keys) for retrieval: several captions per image."""
    stream = EvalStream(shards, rank, world_size, batch_size, Keyed(DecodeCaptioned(transform)), collate_captioned)
    return eval_loader(stream, num_workers)
