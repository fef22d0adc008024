"""Image-text samples (jpg/png/webp + txt, optional json): decode, tokenize, loaders.

Reads data-prep's image_text shards and img2dataset's output unchanged: the caption is KEY.txt, else
the "caption" field of KEY.json (both write it). A sample without a usable image or caption is
skipped and counted with its reason, never fatal.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch.utils.data import DataLoader

from pipeline.data.labelled import decode_image, eval_transform, train_transform
from pipeline.data.mixing import MixedStream
from pipeline.data.reader import ShardStream, SkipSample, collate
from pipeline.data.shards import Shard


def read_caption(raw: dict) -> str:
    """The sample's caption; SkipSample with the reason when it has none."""
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("caption not utf-8") from None
    elif "json" in raw:
        try:
            caption = json.loads(raw["json"]).get("caption")
        except (ValueError, AttributeError):
            raise SkipSample("no caption (unreadable json)") from None
        if not isinstance(caption, str):
            raise SkipSample("no caption")
    else:
        raise SkipSample("no caption")
    caption = caption.strip()
    if not caption:
        raise SkipSample("empty caption")
    return caption


class DecodeImageText:
    """Picklable decode function: raw sample -> (image tensor, token ids of the caption)."""

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        caption = read_caption(raw)  # checked first: a captionless sample is not worth decoding
        image = self.transform(decode_image(raw))
        return image, self.tokenizer([caption])[0]


def source_streams(sources: list[list[Shard]], decode: Callable, rank: int, world_size: int, seed: int,
                   training: bool, shuffle_buffer: int, start_epoch: int) -> list[ShardStream]:
    return [
        ShardStream(shards, rank, world_size, decode, seed=seed + index, shuffle=training,
                    shuffle_buffer=shuffle_buffer, endless=training, start_epoch=start_epoch)
        for index, shards in enumerate(sources)
    ]


def image_text_loader(sources: list[list[Shard]], data_cfg, tokenizer: Callable, rank: int, world_size: int,
                      seed: int, training: bool, batch_size: int, weights: tuple[float, ...] | None = None,
                      start_epoch: int = 0, generator: torch.Generator | None = None) -> DataLoader:
    """Batches of ((images, tokens), skipped reasons). Several sources with weights are mixed per sample;
    without weights all sources form one stream (each source then contributes by its size)."""
    transform = train_transform(data_cfg) if training else eval_transform(data_cfg)
    decode = DecodeImageText(transform, tokenizer)
    if weights is not None and len(sources) > 1:
        streams = source_streams(sources, decode, rank, world_size, seed, training, data_cfg.shuffle_buffer,
                                 start_epoch)
        dataset = MixedStream(streams, weights, seed=seed, start_epoch=start_epoch)
    else:
        shards = [shard for source in sources for shard in source]
        dataset = source_streams([shards], decode, rank, world_size, seed, training, data_cfg.shuffle_buffer,
                                 start_epoch)[0]
    workers = data_cfg.num_workers_per_rank
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, drop_last=training,
        persistent_workers=False, pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
        generator=generator,
    )
