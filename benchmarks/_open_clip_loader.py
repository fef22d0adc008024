"""Runs in the reference venv (benchmarks/setup_openclip_venv.sh): open_clip_train's own webdataset
training loader on the given shards, timed like `launch benchmark-data`; prints one JSON line.

    /tmp/bench/openclip-venv/bin/python benchmarks/_open_clip_loader.py --shards '/tmp/bench/shards/shard-{00000..00015}.tar' \\
        --samples 4000 --workers 2 --steps 30
"""
import argparse
import json
import os
import time
from types import SimpleNamespace


def child_pids():
    """Direct children of this process (the DataLoader workers; WebLoader hides its DataLoader)."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def cpu_seconds(pids):
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args()

    import open_clip
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset

    # What open_clip_train's main builds: the model's preprocess_train (image_transform with the default
    # AugmentationCfg: RandomResizedCrop scale (0.9, 1), bicubic, ToTensor, Normalize) and its tokenizer.
    preprocess = image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    train_args = SimpleNamespace(
        train_data=args.shards, val_data=None, train_num_samples=args.samples, val_num_samples=None,
        train_data_upsampling_factors=None, dataset_resampled=False, seed=0, batch_size=args.batch_size,
        workers=args.workers, world_size=1,
    )
    data = get_wds_dataset(train_args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    data.set_epoch(0)
    warmup = args.warmup if args.warmup is not None else max(2, 2 * args.workers)
    if warmup + args.steps > data.dataloader.num_batches:
        raise SystemExit(f"warm-up + steps exceed one epoch ({data.dataloader.num_batches} batches)")
    batches = iter(data.dataloader)
    for _ in range(warmup):
        images, texts = next(batches)
    pids = child_pids()
    cpu0, wall0 = cpu_seconds(pids), time.perf_counter()
    samples = 0
    for _ in range(args.steps):
        images, texts = next(batches)
        samples += len(texts)
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds(pids) - cpu0
    print(json.dumps({
        "loader": "open_clip_train.data.get_wds_dataset", "workers": args.workers, "child_processes": len(pids), "samples": samples,
        "wall_seconds": wall, "cpu_seconds": cpu, "samples_per_second": samples / wall,
        "samples_per_second_per_core": samples / wall / max(1, args.workers),
        "samples_per_cpu_second": samples / cpu,
        "image_batch": [list(images.shape), str(images.dtype)], "text_batch": [list(texts.shape), str(texts.dtype)],
        "open_clip": open_clip.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
