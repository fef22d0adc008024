"""Zero-shot eval speed (issue 15, "Evaluation speed"): `launch eval zeroshot` vs CLIP_benchmark's
`clip_benchmark eval`, same exported checkpoint, same webdataset eval set, CPU, same batch size and
workers, fp32 on both sides, measured in one run, interleaved (A, B, A, B, ...).

    bash benchmarks/setup_clipbench_venv.sh                  # once: /tmp/bench/clipbench-venv
    .venv/bin/python benchmarks/eval_vs_clip_benchmark.py --reps 3 --samples 6000 [--batch-size 64] [--workers 2]

Data (made on first use under /tmp/bench/evalbench/wds_photo10_<samples>): photo-crop JPEGs at 224 x 224
(benchmarks/make_image_text_shards.py's crops of scikit-learn's sample photos, quality 95), 10 classes,
8 shards in CLIP_benchmark's wds layout (test/0.tar..7.tar, test/nshards.txt, classnames.txt,
zeroshot_classification_templates.txt with CLIP's 18 CIFAR-10 prompts).
Checkpoint (--weights): `trained` (default) = configs/smoke_clip.yaml (open_clip's `clip-tiny-rn`, a
ModifiedResNet at 32 px) trained 40 steps on the digits corpus with `launch pretrain --no-ray`, exported
with `launch export --format open_clip` (made once, ~3 min); `random` = open_clip's random init, seed 0.
Both tools load the same .pt + config JSON unchanged. The labels of the photo crops are index % 10, so
accuracy sits near chance; what matters is that both tools score every image the same way: acc1, acc5 and
mean per-class recall must be equal to the last digit (trained weights give varied predictions, where
random init predicts nearly one class).

CLIP_benchmark defaults to bf16 autocast on CPU; it runs with --no_amp here, so both sides compute in fp32.
Per command: whole-process wall seconds (interpreter start, imports, model load, evaluation, result
writing) and CPU seconds of the command and every child process it waited for (DataLoader workers), from
getrusage(RUSAGE_CHILDREN); and the seconds inside the evaluation call alone (text classifier + image pass,
loader start included; benchmarks/_eval_timer.py). Medians over --reps; the 1/5/15-min load average is
recorded per run (a second tenant on the machine shows in wall time far more than in CPU seconds).
JSON lines go to --out.
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
TRAIN_STEPS = 40  # smoke_clip.yaml: ~0.6-0.9 zero-shot acc1 on its held-out digits by step 50
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


def make_checkpoint(folder: Path, weights_kind: str) -> Path:
    """The open_clip weights both tools load: `trained` (default) = the smoke CLIP config trained briefly
    without Ray, then `launch export --format open_clip`; `random` = open_clip's random init, seed 0."""
    folder = folder / weights_kind
    weights = folder / f"{MODEL}.pt"
    if weights.is_file():
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    if weights_kind == "trained":
        return train_and_export(folder, weights)
    import open_clip
    import torch

    config = folder / f"{MODEL}.json"
    shutil.copy(REPO / "pipeline/models/clip_configs" / f"{MODEL}.json", config)
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    torch.save(model.state_dict(), weights)
    return weights


def train_and_export(folder: Path, weights: Path, steps: int = TRAIN_STEPS) -> Path:
    """configs/smoke_clip.yaml for `steps` steps in this process (`--no-ray`, ~1-2 min on 2 cores), exported
    with `launch export --format open_clip` (which writes NAME.json beside the weights)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "launch"]
    print(f"[bench] training the smoke CLIP for {steps} steps under {folder}", file=sys.stderr)
    for command in ([*launch, "pretrain", "--config", "configs/smoke_clip.yaml", "--no-ray",
                     "--set", f"schedule.max_steps={steps}", "--set", f"run.output_dir={folder / 'train'}",
                     "--set", "eval.every_steps=0", "--set", f"checkpoint.every_steps={steps}"],
                    [*launch, "export", "--checkpoint", str(folder / "train" / "smoke_clip"), "--format", "open_clip",
                     "--output", str(weights)]):
        out = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO), env=env)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    if not weights.with_suffix(".json").is_file():
        raise SystemExit(f"{weights.with_suffix('.json')}: launch export wrote no model config")
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
    parser.add_argument("--weights", choices=("trained", "random"), default="trained",
                        help="trained: the smoke CLIP after %d steps, exported (default); random: open_clip init"
                             % TRAIN_STEPS)
    parser.add_argument("--out", default="/tmp/bench/evalbench/results.jsonl")
    args = parser.parse_args()
    root = Path(args.root)
    data = root / f"wds_photo10_{args.samples}"
    make_eval_set(data, args.samples, args.shards)
    weights = make_checkpoint(root / "model", args.weights)
    cases = {"clip_benchmark": run_reference, "ours": run_ours}
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for rep in range(args.reps):
        for name, run in cases.items():
            row = run(data, weights, args.batch_size, args.workers, root / f"{name}.json")
            row.update(case=name, rep=rep, images=args.samples, weights=args.weights, loadavg=_loadavg(),
                       images_per_second=args.samples / row["eval_seconds"],
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            runs[name].append(row)
            with open(args.out, "a") as sink:
                sink.write(json.dumps(row) + "\n")
            print(f"[{name} rep {rep}] wall {row['wall_seconds']:.1f} s, CPU {row['cpu_seconds']:.1f} s, "
                  f"eval span {row['eval_seconds']:.2f} s, load {row['loadavg']}, "
                  f"acc1 {row['metrics']['acc1']:.4f}", file=sys.stderr)
    print_table(args, runs)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_table(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    keys = ("wall_seconds", "cpu_seconds", "eval_seconds")
    med = {name: {k: statistics.median(r[k] for r in rows) for k in keys} for name, rows in runs.items()}
    loads = sorted(float(r["loadavg"].split()[0]) for rows in runs.values() for r in rows)
    print(f"\n{args.samples} images, {args.weights} weights, batch {args.batch_size}, {args.workers} workers, "
          f"CPU fp32, median of {args.reps} interleaved reps, 1-min load {loads[0]:.1f}-{loads[-1]:.1f}\n")
    print("| tool | whole command wall s | CPU s (command + its children) | eval span s | images/s (eval span) "
          "| acc1 | acc5 | mean per-class recall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        m = rows[-1]["metrics"]
        print(f"| {name} | {med[name]['wall_seconds']:.2f} | {med[name]['cpu_seconds']:.2f} | "
              f"{med[name]['eval_seconds']:.2f} | {args.samples / med[name]['eval_seconds']:.0f} | {m['acc1']:.4f} | "
              f"{m['acc5']:.4f} | {m['mean_per_class_recall']:.4f} |")
    ref, ours = med["clip_benchmark"], med["ours"]
    same = all(r["metrics"][k] == runs["clip_benchmark"][0]["metrics"][k] for rows in runs.values() for r in rows
               for k in ("acc1", "acc5", "mean_per_class_recall"))
    ratio = {k: ref[k] / ours[k] for k in keys}
    print(f"\nspeed ours / CLIP_benchmark (goal >= 2x): whole command wall {ratio['wall_seconds']:.2f}x, "
          f"CPU s {ratio['cpu_seconds']:.2f}x, eval span {ratio['eval_seconds']:.2f}x; "
          f"accuracies identical in every rep: {same}")


if __name__ == "__main__":
    main()
