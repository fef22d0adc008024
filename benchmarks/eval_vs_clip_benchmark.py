"""Zero-shot eval speed (issue 5, Performance): `launch eval zeroshot` vs CLIP_benchmark's
`clip_benchmark eval`, same exported checkpoint, same webdataset eval set, CPU, same batch size and
workers, fp32 on both sides, measured in one run, interleaved (A, B, A, B, ...).

    bash benchmarks/setup_clipbench_venv.sh                  # once: /tmp/bench/clipbench-venv
    .venv/bin/python benchmarks/eval_vs_clip_benchmark.py [--reps 3] [--batch-size 64] [--workers 2]

Data (made on first use under /tmp/bench/evalbench/wds_photo10): 2,000 photo-crop JPEGs at 224 x 224
(benchmarks/make_image_text_shards.py's crops of scikit-learn's sample photos, quality 95), 10 classes,
8 shards in CLIP_benchmark's wds layout (test/0.tar..7.tar, test/nshards.txt, classnames.txt,
zeroshot_classification_templates.txt with CLIP's 18 CIFAR-10 prompts).
Checkpoint: open_clip's `clip-tiny-rn` (pipeline/models/clip_configs, a ModifiedResNet at 32 px),
random init with seed 0, saved as an open_clip state dict (.pt) with its config JSON beside it: what
`launch export --format open_clip` writes, loaded by both tools unchanged.

CLIP_benchmark defaults to bf16 autocast on CPU; it runs with --no_amp here, so both sides compute
in fp32 and the accuracies must match exactly. Images/s = images / seconds spent in the evaluation
call (text classifier + image pass, data loader start included; imports and model load are not), the
median over --reps. Wall seconds of the whole command are reported too. Writes JSON lines to --out.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REF_VENV = Path(os.environ.get("CLIPBENCH_VENV", "/tmp/bench/clipbench-venv"))
MODEL = "clip-tiny-rn"
CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CLIP's CIFAR-10 prompts, as CLIP_benchmark ships them.
TEMPLATES = ("a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of a {c}.",
             "a low contrast photo of a {c}.", "a high contrast photo of a {c}.", "a bad photo of a {c}.",
             "a good photo of a {c}.", "a photo of a small {c}.", "a photo of a big {c}.", "a photo of the {c}.",
             "a blurry photo of the {c}.", "a black and white photo of the {c}.", "a low contrast photo of the {c}.",
             "a high contrast photo of the {c}.", "a bad photo of the {c}.", "a good photo of the {c}.",
             "a photo of the small {c}.", "a photo of the big {c}.")


def make_eval_set(root: Path, num_samples: int, num_shards: int, size_px: int = 224) -> None:
    if (root / "test" / "nshards.txt").is_file():
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    import webdataset as wds
    from make_image_text_shards import _photo_crop
    from sklearn.datasets import load_sample_images

    photos, rng = list(load_sample_images().images), np.random.default_rng(0)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    per_shard = -(-num_samples // num_shards)
    for shard in range(num_shards):
        with wds.TarWriter(str(tmp / "test" / f"{shard}.tar")) as sink:
            for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
                buffer = io.BytesIO()
                _photo_crop(photos, rng, size_px).save(buffer, format="JPEG", quality=95)
                sink.write({"__key__": f"s{index:07d}", "jpg": buffer.getvalue(), "cls": str(index % len(CLASSNAMES))})
    (tmp / "test" / "nshards.txt").write_text(f"{num_shards}\n")
    (tmp / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (tmp / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    tmp.rename(root)


def make_checkpoint(folder: Path) -> Path:
    weights = folder / f"{MODEL}.pt"
    if weights.is_file():
        return weights
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{MODEL}.json"
    shutil.copy(REPO / "pipeline/models/clip_configs" / f"{MODEL}.json", config)
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    torch.save(model.state_dict(), weights)
    return weights


def _cpu_seconds_children() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(command: list[str], cwd: str) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    cpu0, start = _cpu_seconds_children(), time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    wall, cpu = time.perf_counter() - start, _cpu_seconds_children() - cpu0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "wall_seconds": wall, "cpu_seconds": cpu}


def run_ours(data: Path, weights: Path, batch: int, workers: int, out_json: Path) -> dict:
    return _run([sys.executable, str(REPO / "benchmarks/_eval_timer.py"), "ours", "--", "eval", "zeroshot",
                 "--checkpoint", str(weights), "--model", str(weights.with_suffix(".json")), "--data", str(data),
                 "--batch-size", str(batch), "--workers", str(workers), "--device", "cpu",
                 "--output", str(out_json)], cwd=str(REPO))


def run_reference(data: Path, weights: Path, batch: int, workers: int, out_json: Path) -> dict:
    python = REF_VENV / "bin/python"
    if not python.is_file():
        raise SystemExit(f"reference venv missing: run `bash benchmarks/setup_clipbench_venv.sh {REF_VENV}` first")
    return _run([str(python), str(REPO / "benchmarks/_eval_timer.py"), "clip_benchmark",
                 str(weights.with_suffix(".json")), "--", "eval", "--dataset", f"wds/{data.name}",
                 "--dataset_root", str(data), "--task", "zeroshot_classification", "--model", MODEL,
                 "--pretrained", str(weights), "--batch_size", str(batch), "--num_workers", str(workers),
                 "--no_amp", "--output", str(out_json)], cwd="/tmp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/bench/evalbench")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench/evalbench/results.jsonl")
    args = parser.parse_args()
    root = Path(args.root)
    data = root / "wds_photo10"
    make_eval_set(data, args.samples, args.shards)
    weights = make_checkpoint(root / "model")
    cases = {"clip_benchmark": run_reference, "ours": run_ours}
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for rep in range(args.reps):
        for name, run in cases.items():
            row = run(data, weights, args.batch_size, args.workers, root / f"{name}.json")
            row.update(case=name, rep=rep, images=args.samples, load_1min=os.getloadavg()[0],
                       images_per_second=args.samples / row["eval_seconds"],
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            runs[name].append(row)
            with open(args.out, "a") as sink:
                sink.write(json.dumps(row) + "\n")
            print(f"[{name} rep {rep}] {row['images_per_second']:.1f} images/s (eval {row['eval_seconds']:.2f} s, "
                  f"wall {row['wall_seconds']:.1f} s, load {row['load_1min']:.1f}) acc1 {row['metrics']['acc1']:.4f}",
                  file=sys.stderr)
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("images_per_second", "eval_seconds",
                                                                        "wall_seconds", "cpu_seconds")}
           for name, rows in runs.items()}
    print(f"\n{args.samples} images, batch {args.batch_size}, {args.workers} workers, CPU fp32, "
          f"median of {args.reps}\n")
    print("| tool | images/s (eval) | eval s | command wall s | CPU s (process) | acc1 | acc5 "
          "| mean per-class recall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        m = rows[-1]["metrics"]
        print(f"| {name} | {med[name]['images_per_second']:.1f} | {med[name]['eval_seconds']:.2f} | "
              f"{med[name]['wall_seconds']:.1f} | {med[name]['cpu_seconds']:.1f} | {m['acc1']:.4f} | "
              f"{m['acc5']:.4f} | {m['mean_per_class_recall']:.4f} |")
    ratio = med["ours"]["images_per_second"] / med["clip_benchmark"]["images_per_second"]
    same = all(abs(runs["ours"][-1]["metrics"][k] - runs["clip_benchmark"][-1]["metrics"][k]) < 1e-9
               for k in ("acc1", "acc5", "mean_per_class_recall"))
    print(f"\nratio ours / CLIP_benchmark: {ratio:.2f}x images/s (goal >= 2x); accuracies identical: {same}")


if __name__ == "__main__":
    main()
