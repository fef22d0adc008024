"""`launch benchmark-data` and the fast decode path (pipeline.data.fast_image) on the digits corpus.

Correctness only (speed lives in benchmarks/): the command runs any labelled or image-text shard folder
and ends with the samples/s line; the fast path turns a sample into what the plain path makes of it,
within the documented tolerance, for the same per-sample seed.
"""
from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main
from pipeline.config import DataSection
from pipeline.data.fast_image import (FastRandomResizedCrop, UInt8Collate, fast_path_supported,
                                      fast_train_crop, normalize_on_device)
from pipeline.data import reasons
from pipeline.data.labelled import DecodeLabelled, FastDecodeLabelled, train_transform
from pipeline.data.reader import decode_image
from pipeline.data.reasons import SkipSample
from pipeline.data.shards import resolve_shards
from pipeline.data.stream import ResumableStream, seed_sample_rng

LINE = re.compile(r"\[benchmark-data\] ([\d.]+) samples/s, ([\d.]+) samples/s per core \(cores = (.+?)\); "
                  r"(\d+) samples in (\d+) batches")
REPO = Path(__file__).resolve().parent.parent


def bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["benchmark-data", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_labelled_digits_fast_and_plain(digits_root, capsys):
    for decode, workers in (("fast", "1"), ("plain", "0")):
        code, out, err = bench(capsys, "--config", str(REPO / "configs/smoke_resnet.yaml"),
                               "--data", str(digits_root / "labelled/train"), "--batch-size", "16",
                               "--workers", workers, "--steps", "3", "--warmup", "1", "--decode", decode)
        assert code == 0, err
        assert "labelled shards" in out and f"{decode} decode" in out
        match = LINE.search(out.strip().splitlines()[-1])
        assert match, out
        assert float(match[1]) > 0 and int(match[4]) == 48 and int(match[5]) == 3
        assert match[3].startswith("1 loader worker" if workers == "1" else "1: no workers")


def test_image_text_without_manifest_detected_from_extensions(digits_root, tmp_path, capsys):
    # Another tool's layout: tars only, no manifest, no sizes.json.
    for tar in (digits_root / "image_text/train").glob("*.tar"):
        shutil.copy(tar, tmp_path / tar.name)
    code, out, err = bench(capsys, "--config", str(REPO / "configs/smoke_resnet.yaml"), "--data", str(tmp_path),
                           "--image-size", "24", "--batch-size", "8", "--workers", "0", "--steps", "2")
    assert code == 0, err
    assert "image_text shards" in out and "24 px" in out
    assert LINE.search(out.strip().splitlines()[-1])


def test_one_line_errors(digits_root, tmp_path, capsys):
    config = str(REPO / "configs/smoke_clip.yaml")
    code, out, err = bench(capsys, "--config", config, "--data", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        payload = b"{}"
        info = tarfile.TarInfo("sample0.npy")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    code, out, err = bench(capsys, "--config", config, "--data", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "extensions found: npy" in err
    code, out, err = bench(capsys, "--config", config, "--data", str(digits_root / "image_text/train"),
                           "--set", "data.color_jitter=0.4", "--decode", "fast")
    assert code == 2 and "colour jitter" in err


def _stream_batches(shards, decode, collate, cfg: DataSection, count: int):
    stream = ResumableStream(shards, 0, 1, 32, decode, seed=3, shuffle_window=cfg.shuffle_buffer, collate=collate)
    batches = iter(stream)
    return [next(batches).batch for _ in range(count)]


def test_fast_batches_match_plain_batches(digits_root):
    """Same stream, same seeds: the fast path's uint8 crops, normalised, are the plain path's tensors."""
    cfg = DataSection(image_size_px=32, rrc_scale_min=0.3, hflip_prob=0.5, mean=(0.5,) * 3, std=(0.5,) * 3)
    shards = resolve_shards(str(digits_root / "labelled/train"))
    plain = _stream_batches(shards, DecodeLabelled(train_transform(cfg)), torch.utils.data.default_collate, cfg, 3)
    fast = _stream_batches(shards, FastDecodeLabelled(fast_train_crop(cfg)), UInt8Collate(), cfg, 3)
    for (plain_images, plain_labels), (fast_images, fast_labels) in zip(plain, fast):
        assert fast_images.dtype == torch.uint8 and fast_images.shape == plain_images.shape
        assert fast_images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fast_labels, plain_labels)
        levels = (normalize_on_device(fast_images, cfg.mean, cfg.std) - plain_images).abs() * 0.5 * 255
        # Tolerance without DCT scaling: torch's antialiased resize vs Pillow's, +-2 grey levels at most.
        assert levels.max() <= 2.5 and levels.mean() < 0.1, (levels.max(), levels.mean())


def _photo_jpeg(size_px: int) -> bytes:
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg")).resize((size_px, size_px * 2 // 3))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_draft_mode_close_to_full_decode():
    """Crops >= 2x the output decode at 1/2..1/8 size (DCT scaling): close to the full decode's result."""
    data, cfg = _photo_jpeg(600), DataSection(image_size_px=48, rrc_scale_min=0.08, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain, fast = train_transform(cfg), fast_train_crop(cfg)
    means = []
    for position in range(40):
        seed_sample_rng(0, 0, position)
        reference = plain(decode_image({"jpg": data}))
        seed_sample_rng(0, 0, position)
        crop = fast(data)
        levels = (normalize_on_device(crop[None], cfg.mean, cfg.std)[0] - reference).abs() * 0.5 * 255
        means.append(levels.mean().item())
    # Documented tolerance with draft mode: the box snaps to the reduced grid (< 1 output px) and DCT
    # scaling low-passes differently: a few grey levels on average, never a different crop or flip.
    assert np.mean(means) < 4 and max(means) < 12, means


def test_fast_crop_formats_and_corrupt_data():
    crop = FastRandomResizedCrop(16, hflip_prob=0.0)
    for mode, fmt in (("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30), 7 if mode == "P" else None).save(buffer, format=fmt)
        image = crop(buffer.getvalue())
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    with pytest.raises(SkipSample, match=f"^{reasons.CORRUPT_IMAGE}$"):
        crop(b"\xff\xd8\xff\xe0 not really a jpeg")
    jpeg = _photo_jpeg(120)
    with pytest.raises(SkipSample, match=f"^{reasons.CORRUPT_IMAGE}$"):  # truncated: skipped, as the plain path does
        crop(jpeg[: len(jpeg) // 2])
    with pytest.raises(SkipSample, match=f"^{reasons.NO_IMAGE}$"):
        FastDecodeLabelled(crop)({"cls": b"1"})


def test_normalize_on_device_and_support():
    images = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels_last
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = normalize_on_device(images, mean, std)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert normalize_on_device(expected, mean, std) is expected  # already float: untouched
    assert fast_path_supported(DataSection()) is None
    assert "RandAugment" in fast_path_supported(DataSection(randaugment="rand-m6"))
