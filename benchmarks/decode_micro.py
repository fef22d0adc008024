"""Per-sample CPU cost of the training decode: plain path (PIL + timm transform) vs the fast path.

    .venv/bin/python benchmarks/decode_micro.py [--shards /tmp/bench/shards]

One process, one thread, `time.process_time` (robust to other load on a shared machine). Images:
the 256 px benchmark shards, and scikit-learn's two sample photos re-encoded at 640 x 427 and upscaled to
1280 x 854 (JPEG quality 92), where Pillow's draft mode (DCT scaling) can decode at reduced size.
Transform: timm's ImageNet recipe, RandomResizedCrop 224 scale (0.08, 1), flip 0.5, bilinear; the plain
path ends in a normalised float tensor, the fast path in uint8 (normalised later, on the device).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import DataSection  # noqa: E402
from pipeline.data.fast_image import fast_train_crop  # noqa: E402
from pipeline.data.labelled import train_transform  # noqa: E402
from pipeline.data.reader import decode_image  # noqa: E402


def photos(scale: float) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        image = Image.fromarray(array)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def per_sample_us(fn, items: list[bytes], reps: int) -> float:
    fn(items[0])
    start = time.process_time()
    for _ in range(reps):
        for data in items:
            fn(data)
    return 1e6 * (time.process_time() - start) / (reps * len(items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="/tmp/bench/shards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DataSection(image_size_px=224, rrc_scale_min=0.08, hflip_prob=0.5)
    plain, fast = train_transform(cfg), fast_train_crop(cfg)
    with tarfile.open(sorted(Path(args.shards).glob("*.tar"))[0]) as tar:
        shard_jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:200]
    sets = {"256px shards": (shard_jpegs, 2), "640x427 photos": (photos(1.0), 100),
            "1280x854 photos": (photos(2.0), 40)}
    for name, (items, reps) in sets.items():
        plain_us = per_sample_us(lambda d: plain(decode_image({"jpg": d})), items, reps)
        fast_us = per_sample_us(fast, items, reps)
        print(json.dumps({"images": name, "plain_us": round(plain_us, 1), "fast_us": round(fast_us, 1),
                          "speedup": round(plain_us / fast_us, 2)}))


if __name__ == "__main__":
    main()
