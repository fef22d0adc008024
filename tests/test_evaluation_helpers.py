"""Shared builders for the evaluation and export tests (no tests here): a tiny randomly initialised
open_clip model registered from a JSON config, real webdataset shards, fake checkpoints of our layout."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from webdataset import TarWriter

TINY_CLIP = "tiny-eval-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    return model.eval()


def random_images(num: int, seed: int, size: int = 40) -> list[Image.Image]:
    """Smooth-ish colour images, not square to the model's 32 px so resize + crop are exercised."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num):
        base = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size + 8, size), Image.BILINEAR)
        images.append(img)
    return images


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> list[Path]:
    """samples: dicts of extension -> bytes/str (without __key__); written as folder/000000.tar ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"{shard:06d}.tar"
        with TarWriter(str(path)) as sink:
            for i, sample in enumerate(samples[start:start + per_shard]):
                sink.write({"__key__": f"s{start + i:07d}", **sample})
        paths.append(path)
    return paths


def write_toy_zeroshot_set(folder: Path) -> tuple[str, Path, Path]:
    """A registered tiny CLIP, its weights file and a 6-image, 3-class CLIP_benchmark-layout set under
    `folder`: (model name, weights path, data folder)."""
    name = register_tiny_clip(folder / "configs")
    torch.save(tiny_clip(seed=2).state_dict(), folder / "tiny.pt")
    data = folder / "wds_toy"
    write_shards(data / "test", labelled_samples(random_images(6, seed=0), [0, 1, 2, 0, 1, 2]), per_shard=3)
    (data / "classnames.txt").write_text("red\ngreen\nblue\n")
    (data / "zeroshot_classification_templates.txt").write_text("a {c} image.\n")
    return name, folder / "tiny.pt", data


def labelled_samples(images: list[Image.Image], labels: list[int]) -> list[dict]:
    return [{"png": png_bytes(img), "cls": str(label).encode()} for img, label in zip(images, labels)]


def write_our_checkpoint(run_dir: Path, step: int, state: dict[str, torch.Tensor], config: dict,
                         complete: bool = True) -> Path:
    """Our checkpoint layout without DeepSpeed's engine: the ZeRO-0 model-states file plus meta.json."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"module": state}, ckpt / "mp_rank_00_model_states.pt")
    if complete:
        meta = {"step": step, "epoch": 0, "zero_stage": 0, "config": config, "complete": True}
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt
