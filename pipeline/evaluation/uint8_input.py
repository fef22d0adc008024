"""Evaluation batches as uint8 pixels, normalised where the model runs (pipeline.data.fast_image's
normalize_on_device does the same for training, with one fused multiply-add that rounds differently from
torchvision's ToTensor + Normalize: evaluation keeps torchvision's operations so its scores stay bit-identical).

A model's eval transform (open_clip's: Resize, CenterCrop, convert to RGB, ToTensor, Normalize; timm's:
Resize, CenterCrop, ToTensor, Normalize) is split at its ToTensor: the loader workers run the PIL steps and
hand over uint8 HWC tensors, PIL's own memory order (a quarter of float32's bytes through the DataLoader's
shared memory, no per-sample float conversion or transpose); `normalise` then views the batch as NCHW
(channels_last memory, free) and does ToTensor's `/ 255` and Normalize's `- mean` and `/ std` on the whole
batch, on the device. The same float32 operations in the same order as torchvision's
per-sample ToTensor + Normalize, so the model sees bit-identical inputs and scores are unchanged
(tests/test_evaluation_uint8.py). A transform of any other shape keeps the plain per-sample path.

Not done here, because it changes pixels and so can change predictions: reduced-size JPEG decode (libjpeg
DCT scaling). The batches may be handed over in channels_last memory (EvalOptions.channels_last): the same
values, though a convolution then sums in another order (logits within float rounding of NCHW's).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.data.stream import StreamBatch


class PilToUint8:
    """Picklable (DataLoader workers may be spawned): PIL image -> the PIL steps -> uint8 (H, W, 3)."""

    def __init__(self, pil_steps: Callable[[Image.Image], Image.Image]):
        self.pil_steps = pil_steps

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.pil_steps(image)
        if image.mode != "RGB":  # ToTensor's channel count follows the mode: only RGB is split off
            raise ValueError(f"uint8 evaluation input expects RGB after the PIL steps, got mode {image.mode}")
        # HWC as PIL stores it: a per-sample transpose to CHW and the batch's strided stack cost ~0.02 ms an
        # image; the batch becomes NCHW-shaped for free in normalise (already channels_last memory).
        return torch.from_numpy(np.array(image, dtype=np.uint8))


@dataclass(frozen=True)
class Uint8Input:
    to_uint8: PilToUint8
    """What the loader workers run in place of the full transform."""
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, images: torch.Tensor, device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) as ToTensor + Normalize would give, on `device`, in
        `memory_format` (channels_last: the HWC batch already is; NCHW: reordered as uint8, a quarter of the
        bytes; the element-wise steps keep the order)."""
        images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return images.float().div(255).sub(mean).div(std)


def split_uint8(transform: Callable) -> Uint8Input | None:
    """The uint8 split of a Compose ending in ToTensor (or a subclass: open_clip's and timm's MaybeToTensor)
    + Normalize with PIL steps before it; None for any other transform."""
    steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, T.Compose) else []
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or type(steps[-1]) is not T.Normalize:
        return None
    if any(isinstance(step, (T.ToTensor, T.Normalize, T.PILToTensor)) for step in steps[:-2]):
        return None
    normalize = steps[-1]
    mean, std = tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    return Uint8Input(PilToUint8(T.Compose(steps[:-2])), mean, std)


def model_input_batches(batches: Iterable[StreamBatch], uint8: Uint8Input | None, device: torch.device,
                        memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[StreamBatch]:
    """The stream with each batch's images as the model takes them: uint8 ones normalised on `device`
    (None: the loader's transform already normalised them), in `memory_format`. Iterating the loader starts
    here (a generator expression takes iter() of its source at once): workers decode while the caller sets up."""
    def prepared(images: torch.Tensor) -> torch.Tensor:
        if uint8 is not None:
            return uint8.normalise(images, device, memory_format)
        return images.contiguous(memory_format=memory_format)

    return (replace(item, batch=replace(item.batch, images=prepared(item.batch.images)))
            if item.batch is not None else item for item in batches)
