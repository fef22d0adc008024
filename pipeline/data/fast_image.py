"""Fast training decode: JPEG -> RandomResizedCrop -> flip as uint8 CHW tensors; normalise on the device.

What the plain path (`labelled.train_transform`: full PIL decode, timm RandomResizedCrop with Pillow's
resize, ToTensor, Normalize) spends per 256 px sample on a 2-core EPYC, and what this path does instead
(benchmarks/RESULTS.md has the measurements):

  * the crop box is drawn first, from the header's size, with timm's own
    `RandomResizedCropAndInterpolation.get_params` (python `random`), and the flip with `torch.rand(1)`
    like torchvision's RandomHorizontalFlip: for the same per-sample seed (stream.seed_sample_rng) a
    sample gets the same crop and flip as on the plain path;
  * decode at reduced size when the crop allows: Pillow's draft mode (libjpeg DCT scaling by 1/2, 1/4,
    1/8) picks the smallest scale at which the crop still covers the output size, so a 224 px crop of a
    1,000 px photo decodes ~16x fewer pixels. When no reduction is possible (256 px shards, 224 crops)
    torchvision's `decode_jpeg` decodes ~25% faster than Pillow and returns HWC memory already;
  * one antialiased resize of the crop with torch's uint8 kernel (the Pillow-compatible AA filter,
    vectorised: ~3-5x faster than Pillow's resize here), no float conversion, no normalisation;
  * batches are collated as uint8 NHWC memory (channels_last NCHW tensors): 4x fewer bytes through the
    DataLoader's shared memory than float32; `normalize_on_device` turns them into normalised floats
    where the model runs;
  * captions are tokenized once per batch in the collate function, not once per sample.

Only RandomResizedCrop + horizontal flip are done here: a config with colour jitter or RandAugment keeps
the plain path (`fast_path_supported` says which).
"""
from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from pipeline.data import reasons
from pipeline.data.reasons import SkipSample

try:  # deprecated in torchvision 0.29 for TorchCodec; without it JPEGs decode through Pillow
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_jpeg = None

INTERPOLATIONS = ("bilinear", "bicubic")
_DRAFT_SCALES = (8, 4, 2)
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO (phone cameras) is a JPEG stream first


def fast_path_supported(data_cfg) -> str | None:
    """None when the config's training augmentation is exactly what this module does, else why not."""
    if data_cfg.color_jitter:
        return "data.color_jitter is set (colour jitter runs on PIL images)"
    if data_cfg.randaugment:
        return "data.randaugment is set (RandAugment runs on PIL images)"
    return None


class FastRandomResizedCrop:
    """raw image bytes -> uint8 tensor (3, size, size), HWC memory (a channels_last view).

    Same randomness as timm's RandomResizedCropAndInterpolation + torchvision's RandomHorizontalFlip:
    `random.uniform/randint` for the box, then `torch.rand(1)` for the flip when hflip_prob > 0."""

    def __init__(self, size_px: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_prob: float = 0.5,
                 interpolation: str = "bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.size_px, self.scale, self.ratio = size_px, tuple(scale), tuple(ratio)
        self.hflip_prob, self.interpolation = hflip_prob, interpolation

    def __call__(self, data: bytes) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(data))  # header only: the size, before anything is decoded
            top, left, height, width = RandomResizedCropAndInterpolation.get_params(image, self.scale, self.ratio)
            flip = self.hflip_prob > 0 and torch.rand(1).item() < self.hflip_prob
            crop = self._decode_crop(image, data, top, left, height, width)
        except SkipSample:
            raise
        except Exception:  # PIL and libjpeg raise many types for corrupt data
            raise SkipSample(reasons.CORRUPT_IMAGE) from None
        if crop.shape[-2:] != (self.size_px, self.size_px):
            crop = F.interpolate(crop, size=(self.size_px, self.size_px), mode=self.interpolation,
                                 antialias=True, align_corners=False)
        if flip:
            crop = crop.flip(-1)
        return crop[0]

    def _decode_crop(self, image: Image.Image, data: bytes, top: int, left: int, height: int,
                     width: int) -> torch.Tensor:
        """The crop box's pixels as a (1, 3, h, w) channels_last uint8 tensor, decoded as small as allowed."""
        jpeg = image.format in _JPEG_FORMATS
        scale = self._draft_scale(height, width) if jpeg else 1
        if scale == 1 and jpeg and decode_jpeg is not None:
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            box = pixels[:, top:top + height, left:left + width].unsqueeze(0)
            return box.contiguous(memory_format=torch.channels_last)
        if scale > 1:
            # Ask for the whole image at 1/scale; Pillow picks the largest DCT scale not above it.
            full_w, full_h = image.size
            image.draft("RGB", (full_w // scale, full_h // scale))
            scale_x, scale_y = full_w / image.size[0], full_h / image.size[1]
        else:
            scale_x = scale_y = 1.0
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)
        # The box is rounded to the reduced grid: at most half a reduced pixel (under one output pixel) off.
        rows = _reduced_span(top, height, scale_y, array.shape[0])
        cols = _reduced_span(left, width, scale_x, array.shape[1])
        # np.asarray(PIL image) is read-only; one copy of the crop region makes it a writable tensor.
        return torch.from_numpy(np.array(array[rows, cols])).permute(2, 0, 1).unsqueeze(0)

    def _draft_scale(self, height: int, width: int) -> int:
        """Largest DCT scale (8, 4, 2) at which the crop still covers the output size, else 1."""
        room = min(height, width) // self.size_px
        return next((s for s in _DRAFT_SCALES if s <= room), 1)


def _reduced_span(start: int, length: int, scale: float, limit: int) -> slice:
    begin = min(round(start / scale), limit - 1)
    return slice(begin, min(limit, max(begin + 1, round((start + length) / scale))))


def fast_train_crop(data_cfg) -> FastRandomResizedCrop:
    """The fast equivalent of labelled.train_transform(data_cfg)."""
    why_not = fast_path_supported(data_cfg)
    if why_not:
        raise ValueError(f"the fast decode path does not apply: {why_not}")
    return FastRandomResizedCrop(data_cfg.image_size_px, scale=(data_cfg.rrc_scale_min, 1.0),
                                 hflip_prob=data_cfg.hflip_prob, interpolation=data_cfg.interpolation)


class UInt8Collate:
    """[(uint8 image, label or caption), ...] -> (uint8 NCHW channels_last batch, labels or token ids).

    In a DataLoader worker the batch is written straight into shared memory (as default_collate does),
    as NHWC bytes: one contiguous copy per sample and a quarter of a float32 batch's size."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None = None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, object]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = stack_uint8([image for image, _ in items])
        targets = [target for _, target in items]
        if self.tokenizer is not None:
            return images, self.tokenizer(targets)
        return images, torch.tensor(targets, dtype=torch.long)


def stack_uint8(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) uint8 tensors -> (N, 3, H, W) uint8 in channels_last memory (shared when in a worker)."""
    channels, height, width = images[0].shape
    shape = (len(images), height, width, channels)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    for k, image in enumerate(images):
        out[k].copy_(image.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def normalize_on_device(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                        memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """uint8 (N, 3, H, W) batch -> normalised `dtype` on `device`: (x / 255 - mean) / std.

    The uint8 batch travels (4x fewer bytes than float32; non_blocking from pinned memory), and the
    conversion is one fused multiply-add per pixel where the model runs. Float input is returned moved
    but unchanged (already normalised by the plain path)."""
    images = images.to(device if device is not None else images.device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images if memory_format == torch.preserve_format else images.contiguous(memory_format=memory_format)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device, dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device, dtype=torch.float32)
    out = torch.addcmul(shift.view(1, -1, 1, 1), images.to(torch.float32), scale.view(1, -1, 1, 1))
    if memory_format != torch.preserve_format:
        out = out.contiguous(memory_format=memory_format)
    elif images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(dtype)

