"""CLIP-score throughput of `data-prep filter` on the CPU: pairs/s of one in-process curator (decode, pHash,
the model's eval transform, image + text towers), for the smoke CLIP (clip-tiny-rn, 32 px) and ViT-B-32
(224 px), both with random weights (speed does not depend on them), plus the pHash alone (no checkpoint).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/clip_score.py [--pairs 256] [--batch-size 64]

Images are 256 px JPEG crops of scikit-learn's sample photos (what `data-prep image-text` writes by default);
captions are 12-word sentences. One JSON line per model. Prints the 1-minute load average: this machine is shared.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pairs(num_pairs: int) -> list[tuple[bytes, str]]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    words = "a photo of the red small dog cat on grass near water with tree and sky".split()
    pairs = []
    for i in range(num_pairs):
        photo = photos[i % len(photos)]
        left, top = int(rng.integers(0, photo.width - 256)), int(rng.integers(0, photo.height - 256))
        buffer = io.BytesIO()
        photo.crop((left, top, left + 256, top + 256)).save(buffer, "JPEG", quality=95)
        pairs.append((buffer.getvalue(), " ".join(rng.choice(words, 12))))
    return pairs


def _weights_file(name: str, folder: Path) -> Path:
    """A random-weights open_clip model of architecture `name`, saved as a weights file."""
    import open_clip
    import torch

    from pipeline.models.clip import register_tiny_configs

    register_tiny_configs()  # clip-tiny-rn, the smoke CLIP's architecture
    model = open_clip.create_model(name)
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def _measure(checkpoint: str | None, model_name: str | None, pairs, batch_size: int) -> dict:
    from data_prep.clip_score import Curator

    curator = Curator(checkpoint, model_name)
    curator.process(pairs[:batch_size])  # warm-up: first-call allocations, thread pools
    start = time.perf_counter()
    for first in range(0, len(pairs), batch_size):
        curator.process(pairs[first:first + batch_size])
    seconds = time.perf_counter() - start
    import torch

    return {"model": model_name or "pHash only", "pairs": len(pairs), "batch_size": batch_size,
            "seconds": round(seconds, 2), "pairs_per_s": round(len(pairs) / seconds, 1),
            "torch_threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["clip-tiny-rn", "ViT-B-32"])
    args = parser.parse_args()
    pairs = _pairs(args.pairs)
    print(json.dumps(_measure(None, None, pairs, args.batch_size)), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            path = _weights_file(name, Path(folder))
            print(json.dumps(_measure(str(path), name, pairs, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
