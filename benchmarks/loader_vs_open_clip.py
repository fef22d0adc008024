"""Loader goal (issue 8, goal 1): our training loader vs open_clip_train's own webdataset loader, same
shards, same workers, same output shapes, measured in one run, interleaved (A, B, A, B, ...).

    bash benchmarks/setup_openclip_venv.sh          # once: /tmp/bench/openclip-venv (webdataset 0.2.86)
    .venv/bin/python benchmarks/loader_vs_open_clip.py [--reps 3] [--steps 40] [--workers 1 2]

Shards: benchmarks/make_image_text_shards.py (4,000 photo-crop 256 px JPEGs + captions, 16 tars written
by webdataset's TarWriter with open_clip's sizes.json), made on first use under /tmp/bench/shards.

Work per sample on both sides: decode, RandomResizedCrop 224 (scale 0.9-1, ratio 3/4-4/3, bicubic: open_clip's
defaults), ViT-B-32 tokens (77); batch 64. open_clip's batches are normalised float32, ours uint8 (normalised
on the device by pipeline.data.fast_image.normalize_on_device, which is not loader work).

Cases:
  open_clip_train     open_clip_train.data.get_wds_dataset in the reference venv
  ours                `launch benchmark-data --config benchmarks/loader_clip_b32.yaml --interpolation bicubic`
                      (the training loader: fast decode path)
  ours-plain          `--decode plain`: the PIL + timm transform path (data.fast_decode false), for context

Per core: samples/s divided by loader worker processes. On a shared machine wall time includes other
people's load, so each run also reports samples per CPU-second (workers + main process, from /proc):
the ratio of those is the contention-robust figure. Each case's figure is the median over --reps.
Writes JSON lines to --out and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REF_VENV = Path(os.environ.get("OPENCLIP_VENV", "/tmp/bench/openclip-venv"))
OURS_LINE = re.compile(r"([\d.]+) samples/s, ([\d.]+) samples/s per core .*?(?:; ([\d.]+) samples per CPU-second.*)?$")


def ensure_shards(shards: Path, samples: int) -> None:
    subprocess.run([sys.executable, str(REPO / "benchmarks/make_image_text_shards.py"), "--output", str(shards),
                    "--samples", str(samples), "--shards", "16"], check=True)


def run_reference(shards: Path, samples: int, workers: int, steps: int) -> dict:
    python = REF_VENV / "bin/python"
    if not python.is_file():
        raise SystemExit(f"reference venv missing: run `bash benchmarks/setup_openclip_venv.sh {REF_VENV}` first")
    names = sorted(p.name for p in shards.glob("*.tar"))
    first, last = names[0].split("-")[1].split(".")[0], names[-1].split("-")[1].split(".")[0]
    pattern = str(shards / f"shard-{{{first}..{last}}}.tar")
    out = subprocess.run([str(python), str(REPO / "benchmarks/_open_clip_loader.py"), "--shards", pattern,
                          "--samples", str(samples), "--workers", str(workers), "--steps", str(steps)],
                         capture_output=True, text=True, check=True, cwd="/tmp")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"sps": row["samples_per_second"], "sps_core": row["samples_per_second_per_core"],
            "sp_cpu_s": row["samples_per_cpu_second"], "image_batch": row["image_batch"],
            "text_batch": row["text_batch"]}


def run_ours(shards: Path, workers: int, steps: int, variant: str) -> dict:
    entry = ["-m", "launch"]
    args = ["benchmark-data", "--config", "benchmarks/loader_clip_b32.yaml", "--data", str(shards),
            "--workers", str(workers), "--steps", str(steps)]
    args += ["--decode", "plain" if variant == "ours-plain" else "fast", "--interpolation", "bicubic"]
    command = [sys.executable, *entry, *args]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    match = OURS_LINE.search(out.stdout.strip().splitlines()[-1])
    if not match:
        raise SystemExit(f"unexpected output: {out.stdout[-500:]}")
    return {"sps": float(match[1]), "sps_core": float(match[2]),
            "sp_cpu_s": float(match[3]) if match[3] else None,
            "command": "launch " + " ".join(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description="our loader vs open_clip_train's, same shards and cores")
    parser.add_argument("--shards", default="/tmp/bench/shards")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="timed batches of 64 per run (after warm-up)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["open_clip_train", "ours", "ours-plain"])
    parser.add_argument("--out", default="/tmp/bench/results/loader_vs_open_clip.jsonl")
    args = parser.parse_args()
    shards = Path(args.shards)
    ensure_shards(shards, args.samples)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with open(args.out, "a") as sink:
        for rep in range(args.reps):
            for workers in args.workers:
                for case in args.cases:
                    if case == "open_clip_train":
                        result = run_reference(shards, args.samples, workers, args.steps)
                    else:
                        result = run_ours(shards, workers, args.steps, case)
                    row = {"case": case, "workers": workers, "rep": rep, **result,
                           "load_avg_1min": os.getloadavg()[0],
                           "time": datetime.datetime.now().isoformat(timespec="seconds")}
                    rows.append(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    print(json.dumps(row), flush=True)
    print_table(rows, args.cases, args.workers)


def print_table(rows: list[dict], cases: list[str], worker_counts: list[int]) -> None:
    def median(case: str, workers: int, key: str) -> float | None:
        values = [r[key] for r in rows if r["case"] == case and r["workers"] == workers and r[key] is not None]
        return statistics.median(values) if values else None

    print("\n| workers | case | samples/s | per core | samples per CPU-s | vs open_clip_train (per core / per CPU-s) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for workers in worker_counts:
        ref_core, ref_cpu = median("open_clip_train", workers, "sps_core"), median("open_clip_train", workers, "sp_cpu_s")
        for case in cases:
            sps, core, cpu = (median(case, workers, k) for k in ("sps", "sps_core", "sp_cpu_s"))
            ratio = f"{core / ref_core:.2f}x / {cpu / ref_cpu:.2f}x" if ref_core and ref_cpu and cpu else "-"
            print(f"| {workers} | {case} | {sps:.0f} | {core:.0f} | {cpu:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
