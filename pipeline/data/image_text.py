"""Image-text samples (jpg/png/webp + txt, optional json): decode, tokenize, loaders.

Reads data-prep's image_text shards and img2dataset's output unchanged: the caption is KEY.txt, else
the "caption" field of KEY.json (both write it). A sample without a usable image or caption is
skipped and counted with its reason, never fatal.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import torch

from pipeline.data import reasons
from pipeline.data.fast_image import FastRandomResizedCrop, UInt8Collate, fast_path_supported, fast_train_crop
from pipeline.data.full_batches import Exchange, training_batches
from pipeline.data.labelled import eval_transform, train_transform
from pipeline.data.mixing import MixedStream
from pipeline.data.reader import decode_image, image_bytes
from pipeline.data.reasons import SkipSample
from pipeline.data.shards import Shard
from pipeline.data.stream import EvalStream, Position, ResumableStream, eval_loader


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample(reasons.CAPTION_NOT_UTF8) from None


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        raise SkipSample(reasons.UNREADABLE_JSON) from None
    if not isinstance(value, dict):
        raise SkipSample(reasons.UNREADABLE_JSON)
    return value


def read_caption(raw: dict) -> str:
    """The sample's caption (training shards: KEY.txt, else KEY.json's "caption"); SkipSample with the
    reason when it has none."""
    if "txt" in raw:
        caption = _text(raw["txt"])
    elif "json" in raw:
        caption = _json(raw["json"]).get("caption")
        if not isinstance(caption, str):
            raise SkipSample(reasons.NO_CAPTION)
    else:
        raise SkipSample(reasons.NO_CAPTION)
    caption = caption.strip()
    if not caption:
        raise SkipSample(reasons.EMPTY_CAPTION)
    return caption


def read_captions(raw: dict) -> list[str]:
    """Every caption of a retrieval sample (CLIP_benchmark: one per line of KEY.txt; else KEY.json's
    "captions" list), blank ones left out; SkipSample with the reason when none is left."""
    if "txt" in raw:
        captions = _text(raw["txt"]).splitlines()
    elif "json" in raw:
        captions = _json(raw["json"]).get("captions")
        if not isinstance(captions, list):
            raise SkipSample(reasons.NO_CAPTION)
    else:
        raise SkipSample(reasons.NO_CAPTION)
    captions = [str(c).strip() for c in captions]
    captions = [c for c in captions if c]
    if not captions:
        raise SkipSample(reasons.EMPTY_CAPTION)
    return captions


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
    """StreamBatches of (images, token ids). Training: endless micro-batches, each exactly batch_size
    samples (full_batches.py; `exchange` defaults to torch.distributed's), several weighted sources mixed
    per sample (without weights all sources form one stream, each contributing by its size); evaluation:
    every sample once across ranks (stream.EvalStream)."""
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
    return eval_loader(stream, workers)
