"""Training throughput with eval.async on vs no evaluation at all, the same smoke run otherwise.

    .venv/bin/python benchmarks/async_eval.py --repeats 2

Each run is `launch pretrain --config configs/smoke_resnet.yaml` in its own process (its own embedded Ray
cluster, which reserves the actor's CPU beside the ranks': launch/pretrain.py), checkpointing every
--every-steps in both modes. "off": eval.at_end false, no validation, no eval.async. "async": eval.async true
(the actor scores every checkpoint on data.val with `launch eval classify` while training goes on). Throughput
is the median of the trainer's own train/samples_per_second log windows, the first window (start-up) left out;
"steady" keeps only the windows after step 2 x --every-steps, once the actor has started (its imports take CPU
from the ranks at first on a small machine) and evaluated the first checkpoint.
Modes alternate (off, async, off, async ...) so that load from elsewhere on the machine hits both alike.
Prints one JSON line per run and a Markdown table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MODES = {
    "off": ["eval.at_end=false", "eval.every_steps=0", "eval.async=false"],
    "async": ["eval.at_end=false", "eval.every_steps=0", "eval.async=true"],
}


def _run(mode: str, index: int, args, output_dir: str) -> dict:
    name = f"{mode}_{index}"
    overrides = [f"run.output_dir={output_dir}", f"run.name={name}", f"run.log_every_steps={args.log_every}",
                 f"schedule.max_steps={args.max_steps}", f"checkpoint.every_steps={args.every_steps}",
                 "checkpoint.keep_last=2", f"ray.num_workers={args.workers}",
                 f"ray.cpus_per_worker={args.cpus_per_worker}", f"eval.async_num_cpus={args.async_cpus}",
                 f"data.num_workers_per_rank={args.loader_workers}",
                 *MODES[mode]]
    command = [sys.executable, "-m", "launch", "pretrain", "--config", str(REPO / "configs" / "smoke_resnet.yaml"),
               *(part for override in overrides for part in ("--set", override))]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(output_dir) / name / "metrics.jsonl").read_text().splitlines()]
    windows = [(row["step"], row["train/samples_per_second"]) for row in rows if "train/samples_per_second" in row]
    evaluated = sorted(row["step"] for row in rows if any(key.startswith("eval/") for key in row))
    steady = [rate for step, rate in windows if step > 2 * args.every_steps]
    after_first = [rate for _, rate in windows[1:]]
    return {"mode": mode, "repeat": index, "samples_per_second": round(statistics.median(after_first), 1),
            "steady_samples_per_second": round(statistics.median(steady), 1),
            "windows": [round(r, 1) for _, r in windows], "evaluated_steps": evaluated, "wall_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--every-steps", type=int, default=30, help="checkpoint (and with async: evaluate) every N")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--async-cpus", type=float, default=1.0)
    parser.add_argument("--loader-workers", type=int, default=1,
                        help="data.num_workers_per_rank (0: each rank decodes in its own process, one core per rank)")
    args = parser.parse_args()

    output_dir = tempfile.mkdtemp(prefix="async_eval_bench_")
    runs = []
    for index in range(args.repeats):
        for mode in MODES:
            runs.append(_run(mode, index, args, output_dir))
            print(json.dumps(runs[-1]), flush=True)
    print("\n| mode | measure | samples/s per run | median | vs off |\n|---|---|---|---:|---:|")
    for key in ("samples_per_second", "steady_samples_per_second"):
        medians = {mode: statistics.median(r[key] for r in runs if r["mode"] == mode) for mode in MODES}
        for mode in MODES:
            per_run = ", ".join(str(r[key]) for r in runs if r["mode"] == mode)
            print(f"| {mode} | {key} | {per_run} | {medians[mode]:.1f} | {medians[mode] / medians['off']:.3f} |")


if __name__ == "__main__":
    main()
