"""Image-text samples (jpg/png/webp + txt, optional json): decode, tokenize, loaders.

Reads data-prep's image_text shards and img2dataset's output unchanged: the caption is KEY.txt, else
the "caption" field of KEY.json (both write it). A sample without a usable image or caption is
skipped and counted with its reason, never fatal.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader

from pipeline.data.full_batches import Exchange, training_batches
from pipeline.data.labelled import decode_image, eval_transform, train_transform
from pipeline.data.mixing import MixedStream
from pipeline.data.fast_image import (FastRandomResizedCrop, UInt8Collate, fast_path_supported, fast_train_crop,
                                      image_bytes)
from pipeline.data.reader import SkipSample
from pipeline.data.shards import Shard
from pipeline.data.stream import EvalStream, Position, ResumableStream, as_is


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


class FastDecodeImageText:
    """raw sample -> (uint8 crop, caption); captions are tokenized per batch by UInt8Collate."""

    def __init__(self, crop: FastRandomResizedCrop):
        self.crop = crop

    def __call__(self, raw: dict) -> tuple[torch.Tensor, str]:
        caption = read_caption(raw)  # checked first: a captionless sample is not worth decoding
        return self.crop(image_bytes(raw)), caption


class DecodeImageText:
    """Picklable decode function: raw sample -> (image tensor, token ids of the caption)."""

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        caption = read_caption(raw)  # checked first: a captionless sample is not worth decoding
        image = self.transform(decode_image(raw))
        return image, self.tokenizer([caption])[0]


def image_text_loader(sources: list[list[Shard]], data_cfg, tokenizer: Callable, rank: int, world_size: int,
                      seed: int, training: bool, batch_size: int, weights: tuple[float, ...] | None = None,
                      start: Position = Position(), exchange: Exchange | None = None) -> Iterable:
    """Training: endless (batch, skipped, position) micro-batches, each exactly batch_size samples
    (full_batches.py; `exchange` defaults to torch.distributed's), several weighted sources mixed per
    sample (without weights all sources form one stream, each contributing by its size); evaluation:
    (batch, skipped), every sample once. A batch is (images, token ids)."""
    workers = data_cfg.num_workers_per_rank
    if training:
        if data_cfg.fast_decode and fast_path_supported(data_cfg) is None:
            # uint8 crops; captions tokenized once per batch in the collate
            decode, collate = FastDecodeImageText(fast_train_crop(data_cfg)), UInt8Collate(tokenizer)
        else:
            decode, collate = DecodeImageText(train_transform(data_cfg), tokenizer), torch.utils.data.default_collate
        if weights is not None and len(sources) > 1:
            stream = MixedStream(sources, weights, rank, world_size, batch_size, decode, seed=seed,
                                 shuffle_window=data_cfg.shuffle_buffer, start=start, collate=collate,
                                 shuffle_block=data_cfg.shuffle_block)
        else:
            stream = ResumableStream([s for source in sources for s in source], rank, world_size, batch_size,
                                     decode, seed=seed, shuffle_window=data_cfg.shuffle_buffer, start=start,
                                     collate=collate, shuffle_block=data_cfg.shuffle_block)
        return training_batches(stream, workers, exchange)
    decode = DecodeImageText(eval_transform(data_cfg), tokenizer)
    stream = EvalStream([s for source in sources for s in source], rank, world_size, batch_size, decode)
    return DataLoader(
        stream, batch_size=None, collate_fn=as_is, num_workers=workers, persistent_workers=False,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
    )
