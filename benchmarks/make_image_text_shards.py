"""Realistic image-text shards for loader benchmarks: 256 x 256 photo-crop JPEGs + captions.

Photo content without the network: random crops of scikit-learn's two sample photos (china.jpg,
flower.jpg; 427 x 640), random aspect and scale, resized to 256 x 256 (img2dataset's default
`border`-free square output), colour jitter and sensor-like noise so the JPEGs compress like photos
(~20-30 KB at quality 95, img2dataset's default), not like flat synthetic images.

Written with webdataset's own TarWriter (another tool's shards) plus open_clip's sizes.json, no
manifest: the reader under test must cope with what other tools write.

    python benchmarks/make_image_text_shards.py --output /tmp/bench/shards --samples 4000 --shards 16
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

WORDS = ("a photo of the old temple roof in spring a close up of a pink flower petals with green leaves "
         "blurred background tourists walking near stone stairs bright sunny afternoon colourful garden "
         "traditional chinese architecture wooden pillars red lanterns macro shot of a blossom in the park "
         "with soft light and a clear blue sky over the city").split()


def _photo_crop(photos: list[np.ndarray], rng: np.random.Generator, size_px: int) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.25, 1.0) * min(height, width))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    crop_w, crop_h = min(width, int(side * aspect)), min(height, int(side / aspect))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.resize((size_px, size_px), Image.Resampling.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.6, 1.4)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 8.0), pixels.shape)  # sensor-like noise
    shift = rng.integers(-20, 21, size=3)  # white-balance shift per channel
    return Image.fromarray(np.clip(pixels + shift, 0, 255).astype(np.uint8))


def _write_shard(output: Path, shard: int, first_index: int, count: int, size_px: int, quality: int, seed: int,
                 num_labels: int) -> tuple[str, int, int]:
    """One tar; its images depend on (seed, shard) only, so shards can be written in parallel."""
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    rng = np.random.default_rng([seed, shard])
    name, total_bytes = f"shard-{shard:05d}.tar", 0
    with wds.TarWriter(str(output / name)) as sink:
        for index in range(first_index, first_index + count):
            buffer = io.BytesIO()
            _photo_crop(photos, rng, size_px).save(buffer, format="JPEG", quality=quality)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 21))))
            sample = {"__key__": f"{index:08d}", "jpg": buffer.getvalue(), "txt": caption,
                      "json": json.dumps({"caption": caption, "width": size_px, "height": size_px})}
            if num_labels:
                sample["cls"] = str(index % num_labels)
            sink.write(sample)
            total_bytes += buffer.tell()
    return name, count, total_bytes


def write_shards(output: Path, num_samples: int, num_shards: int, size_px: int = 256, quality: int = 95,
                 seed: int = 0, num_labels: int = 0, processes: int = 1) -> dict:
    """num_labels > 0 also writes a `cls` per sample, so one set of shards serves classifiers too."""
    from concurrent.futures import ProcessPoolExecutor

    output.mkdir(parents=True, exist_ok=True)
    per_shard = -(-num_samples // num_shards)
    jobs = [(output, shard, shard * per_shard, max(0, min(per_shard, num_samples - shard * per_shard)), size_px,
             quality, seed, num_labels) for shard in range(num_shards)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            written = list(pool.map(_write_shard, *zip(*jobs)))
    else:
        written = [_write_shard(*job) for job in jobs]
    sizes = {name: count for name, count, _ in written}
    total_bytes, index = sum(b for _, _, b in written), sum(sizes.values())
    (output / "sizes.json").write_text(json.dumps(sizes))
    return {"samples": index, "shards": num_shards, "mean_jpeg_bytes": total_bytes // max(index, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="/tmp/bench/shards")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--labels", type=int, default=0, help="also write cls = index %% LABELS (classifier shards)")
    parser.add_argument("--processes", type=int, default=1, help="shards written in parallel")
    args = parser.parse_args()
    output = Path(args.output)
    if (output / "sizes.json").is_file() and sum(json.loads((output / "sizes.json").read_text()).values()) == args.samples:
        print(f"shards ready: {output}")
        return
    print(json.dumps({"output": str(output), **write_shards(output, args.samples, args.shards, args.size,
                                                                num_labels=args.labels, processes=args.processes)}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
