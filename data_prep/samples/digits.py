"""A small real corpus from scikit-learn's digits (1,797 labelled 8x8 scans, no network):
labelled train/val shards, image-text shards with varied captions, and a zero-shot eval set.

Layout under root (the trainer and eval stages rely on these paths):
    labelled/{train,val}/      KEY.jpg KEY.cls KEY.json   (+ labelled/_info.json naming both splits)
    image_text/{train,val}/    KEY.jpg KEY.txt KEY.json
    zeroshot/test/             KEY.jpg KEY.cls            (CLIP_benchmark webdataset layout, from val)
    zeroshot/classnames.txt, zeroshot/zeroshot_classification_templates.txt
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_prep.images import encode_jpeg, sha256_hex
from data_prep.manifest import build_manifest, is_complete, write_dataset_metadata, write_parent_timm_info
from data_prep.writer import Sample, publish_dir, write_bytes_atomic, write_shards

SAMPLES_PER_SHARD = 200
JPEG_QUALITY = 95
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Varied caption wording so a contrastive model cannot key on one fixed sentence.
CAPTION_TEMPLATES = (
    "a photo of the handwritten digit {name}",
    "a handwritten {name}",
    "the number {digit} written by hand",
    "a scan of a handwritten number {name}",
    "a black and white image of the digit {digit}",
    "a low resolution picture of a {name}",
    "a blurry drawing of the number {name}",
    "a pixelated handwritten {digit}",
    "someone wrote the digit {name}",
    "a small grayscale scan showing a {digit}",
)
ZEROSHOT_TEMPLATES = (
    "a photo of the handwritten digit {c}.",
    "a handwritten {c}.",
    "a scan of the number {c}.",
    "a blurry image of the digit {c}.",
)
SPLITS = ("train", "val")
_DATASETS = tuple(f"{kind}/{split}" for kind in ("labelled", "image_text") for split in SPLITS)
SOURCE = {"name": "sklearn.datasets.load_digits", "num_rows": 1797}


def digits_corpus_complete(root: Path) -> bool:
    paths = [*_DATASETS, "zeroshot/test"]
    return all(is_complete(Path(root) / p) for p in paths)


def write_digits_corpus(root: Path, image_size_px: int = 32, val_fraction: float = 0.2,
                        seed: int = 0) -> Path:
    """Build the corpus under `root` (idempotent, atomic) and return `root`.

    Everything is written into a staging folder next to `root` and renamed in one step, so a
    crash or a concurrent caller never sees a half-written corpus."""
    root = Path(root)
    if digits_corpus_complete(root):
        if (root / "zeroshot" / "test" / "00000.tar").is_file():
            _rewrite_legacy_zeroshot(root)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists but holds no complete digits corpus; remove it or pick "
                         "another --output")
    if not 0.0 < val_fraction < 1.0 or image_size_px < 8:
        raise ValueError("val_fraction must be in (0, 1) and image_size_px >= 8")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    options = {"image_size_px": image_size_px, "val_fraction": val_fraction, "seed": seed,
               "samples_per_shard": SAMPLES_PER_SHARD, "jpeg_quality": JPEG_QUALITY}
    _build(staging, image_size_px, val_fraction, seed, options)
    publish_dir(staging, root)  # False means a concurrent caller won; its corpus is complete
    if not digits_corpus_complete(root):
        raise RuntimeError(f"{root}: digits corpus incomplete after publishing")
    return root


def _rewrite_legacy_zeroshot(root: Path) -> None:
    """Corpora written before eval shards were named `0.tar ..` (CLIP_benchmark) hold
    zeroshot/test/00000.tar: rebuild just the zero-shot set, with the corpus's own options."""
    options = json.loads((root / "zeroshot" / "test" / "manifest.json").read_text())["options"]
    labels, jpegs, split_indices = _load(options["image_size_px"], options["val_fraction"],
                                         options["seed"])
    staging = root / f".zeroshot.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _write_zeroshot(staging, split_indices["val"], labels, jpegs, options)
    legacy = root / f".zeroshot.legacy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(root / "zeroshot", legacy)
    except FileNotFoundError:  # a concurrent caller is upgrading it right now
        shutil.rmtree(staging, ignore_errors=True)
        return
    os.rename(staging, root / "zeroshot")
    shutil.rmtree(legacy, ignore_errors=True)


def _load(image_size_px: int, val_fraction: float, seed: int):
    """Labels, JPEG bytes and the seeded stratified train/val indices of sklearn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(int)
    jpegs = [_digit_jpeg(pixels, image_size_px) for pixels in digits.images]
    # Stratified and seeded: the same val images every time, every class in both splits.
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                          random_state=seed, stratify=labels)
    split_indices = {"train": [int(i) for i in train_idx], "val": [int(i) for i in val_idx]}
    return labels, jpegs, split_indices


def _build(staging: Path, image_size_px: int, val_fraction: float, seed: int, options: dict) -> None:
    labels, jpegs, split_indices = _load(image_size_px, val_fraction, seed)
    manifests: dict[str, dict] = {}
    for split, indices in split_indices.items():
        samples = [_labelled_sample(i, labels[i], jpegs[i], split, image_size_px) for i in indices]
        manifests[split] = _write(staging / "labelled" / split, "labelled", samples, split, options)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        samples = [_image_text_sample(i, labels[i], jpegs[i], split, image_size_px, rng)
                   for i in indices]
        _write(staging / "image_text" / split, "image_text", samples, split, options)
    write_parent_timm_info(staging / "labelled", "digits", manifests)
    _write_zeroshot(staging / "zeroshot", split_indices["val"], labels, jpegs, options)


def _digit_jpeg(pixels: np.ndarray, size_px: int) -> bytes:
    gray = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return encode_jpeg(gray.resize((size_px, size_px), Image.Resampling.BICUBIC).convert("RGB"),
                       JPEG_QUALITY)


def _key(index: int) -> str:
    return f"digits{index:05d}"


def _meta(index: int, label: int, jpeg: bytes, split: str, size_px: int, **extra: object) -> bytes:
    meta = {"source": SOURCE["name"], "source_row": index, "split": split, "label": int(label),
            "classname": CLASSNAMES[label], "original_width": 8, "original_height": 8,
            "width": size_px, "height": size_px, "sha256": sha256_hex(jpeg), **extra}
    return json.dumps(meta).encode("utf-8")


def _labelled_sample(index: int, label: int, jpeg: bytes, split: str, size_px: int) -> Sample:
    return Sample(_key(index), {"jpg": jpeg, "cls": str(int(label)).encode(),
                                "json": _meta(index, label, jpeg, split, size_px)})


def _image_text_sample(index: int, label: int, jpeg: bytes, split: str, size_px: int,
                       rng: np.random.Generator) -> Sample:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(name=CLASSNAMES[label], digit=int(label))
    return Sample(_key(index), {"jpg": jpeg, "txt": caption.encode("utf-8"),
                                "json": _meta(index, label, jpeg, split, size_px, caption=caption)})


def _write(out_dir: Path, kind: str, samples: list[Sample], split: str, options: dict) -> dict:
    shards = write_shards(out_dir, iter(samples), SAMPLES_PER_SHARD)
    classnames = CLASSNAMES if kind != "image_text" else None
    manifest = build_manifest(kind, shards, source={**SOURCE, "split": split}, options=options,
                              classnames=classnames)
    write_dataset_metadata(out_dir, manifest, split=split, dataset_name=f"digits-{kind}")
    return manifest


def _write_zeroshot(out_dir: Path, val_indices: list[int], labels: np.ndarray,
                    jpegs: list[bytes], options: dict) -> None:
    def samples() -> Iterator[Sample]:
        for i in val_indices:
            yield Sample(_key(i), {"cls": str(int(labels[i])).encode(), "jpg": jpegs[i]})

    test_dir = out_dir / "test"
    # CLIP_benchmark names eval shards 0.tar .. N-1.tar (it expands {0..N-1}.tar from nshards.txt).
    shards = write_shards(test_dir, samples(), SAMPLES_PER_SHARD, padded=False)
    write_bytes_atomic(out_dir / "classnames.txt", ("\n".join(CLASSNAMES) + "\n").encode())
    write_bytes_atomic(out_dir / "zeroshot_classification_templates.txt",
                       ("\n".join(ZEROSHOT_TEMPLATES) + "\n").encode())
    # CLIP_benchmark's webdataset loader reads these two small files as well.
    write_bytes_atomic(out_dir / "dataset_type.txt", b"classification\n")
    write_bytes_atomic(test_dir / "nshards.txt", f"{len(shards)}\n".encode())
    manifest = build_manifest("zeroshot", shards, source={**SOURCE, "split": "val"},
                              options=options, classnames=CLASSNAMES)
    write_dataset_metadata(test_dir, manifest, split="test", dataset_name="digits-zeroshot")
