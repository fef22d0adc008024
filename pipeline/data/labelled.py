"""Labelled image samples (image + cls): decode, timm transforms, loaders."""
from __future__ import annotations

from typing import Iterable

import torch
from timm.data import create_transform

from pipeline.data import reasons
from pipeline.data.fast_image import FastRandomResizedCrop, UInt8Collate, fast_path_supported, fast_train_crop
from pipeline.data.full_batches import Exchange, training_batches
from pipeline.data.reader import decode_image, image_bytes
from pipeline.data.reasons import SkipSample
from pipeline.data.shards import Shard
from pipeline.data.stream import EvalStream, Position, ResumableStream, eval_loader


def read_label(raw: dict) -> int:
    """The sample's class index; SkipSample with the reason when it has none."""
    if "cls" not in raw:
        raise SkipSample(reasons.NO_LABEL)
    try:
        return int(raw["cls"].decode().strip())
    except ValueError:
        raise SkipSample(reasons.BAD_LABEL) from None


class DecodeLabelled:
    """Picklable decode function (DataLoader workers may be spawned): PIL decode + timm transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, raw: dict) -> tuple[torch.Tensor, int]:
        label = read_label(raw)
        return self.transform(decode_image(raw)), label


class FastDecodeLabelled:
    """raw sample -> (uint8 crop, label): the fast twin of DecodeLabelled (pipeline.data.fast_image)."""

    def __init__(self, crop: FastRandomResizedCrop):
        self.crop = crop

    def __call__(self, raw: dict) -> tuple[torch.Tensor, int]:
        label = read_label(raw)
        return self.crop(image_bytes(raw)), label


def train_transform(data_cfg):
    return create_transform(
        input_size=data_cfg.image_size_px, is_training=True, scale=(data_cfg.rrc_scale_min, 1.0),
        hflip=data_cfg.hflip_prob, color_jitter=data_cfg.color_jitter, auto_augment=data_cfg.randaugment,
        interpolation=data_cfg.interpolation, mean=data_cfg.mean, std=data_cfg.std,
    )


def eval_data_config(data_cfg) -> dict:
    """The validation transform as timm's data config (what timm.data.resolve_data_config returns): the
    timm-dir export writes it into config.json, so timm rebuilds this very transform."""
    size_px = data_cfg.val_image_size_px or data_cfg.image_size_px
    return {"input_size": (3, size_px, size_px), "interpolation": data_cfg.interpolation,
            "mean": tuple(data_cfg.mean), "std": tuple(data_cfg.std), "crop_pct": data_cfg.val_crop_pct,
            "crop_mode": "center"}


def eval_transform(data_cfg):
    return create_transform(**eval_data_config(data_cfg), is_training=False)


def labelled_loader(shards: list[Shard], data_cfg, rank: int, world_size: int, seed: int, training: bool,
                    batch_size: int, start: Position = Position(), exchange: Exchange | None = None) -> Iterable:
    """StreamBatches of (images, labels). Training: endless micro-batches, each exactly batch_size samples
    (full_batches.py; `exchange` defaults to torch.distributed's); evaluation: each sample once across
    ranks (stream.EvalStream)."""
    workers = data_cfg.num_workers_per_rank
    if training:
        if data_cfg.fast_decode and fast_path_supported(data_cfg) is None:
            decode, collate = FastDecodeLabelled(fast_train_crop(data_cfg)), UInt8Collate()
        else:
            decode, collate = DecodeLabelled(train_transform(data_cfg)), torch.utils.data.default_collate
        stream = ResumableStream(shards, rank, world_size, batch_size, decode, seed=seed,
                                 shuffle_window=data_cfg.shuffle_buffer, start=start, collate=collate,
                                 shuffle_block=data_cfg.shuffle_block)
        return training_batches(stream, workers, exchange)
    stream = EvalStream(shards, rank, world_size, batch_size, DecodeLabelled(eval_transform(data_cfg)))
    return eval_loader(stream, workers)
