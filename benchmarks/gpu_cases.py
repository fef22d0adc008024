"""GPU goal (issue 8, goal 3): one case per call, one JSON line out. Run by benchmarks/gpu.sh.

Cases (batch 256 per GPU, bf16):
  resnet50_torch   reference: timm resnet50, channels_last, autocast bf16, fused AdamW, eager, synthetic
                   tensors (H100 80GB: 4,004 img/s; compiled 5,592)
  resnet50_ours    our per-worker loop without Ray (pipeline.trainer.run_worker, world size 1): DeepSpeed
                   ZeRO-1, torch_autocast bf16, uint8 channels_last batches from real shards, normalised on
                   the GPU; img/s and data-wait from its metrics.jsonl (goal >= 5,600)
  clip_b32_torch   reference: open_clip ViT-B-32 + ClipLoss, autocast bf16, eager, synthetic (H100 80GB: 3,243)
  clip_b32_ours    our loop on image-text shards, ViT-B-32 (goal >= 5,000 samples/s)
  loader           `launch benchmark-data` on the same shards with --workers (is the loader fast enough?)
MFU = samples/s x GFLOP per sample (24.3 a ResNet-50 step, 44.2 a ViT-B-32 step) / 790 TFLOP/s (the bf16
matmul peak measured on an H100).

    python benchmarks/gpu_cases.py --case resnet50_ours --shards /tmp/gpu_shards --out $OUT/gpu.jsonl
    python benchmarks/gpu_cases.py --case resnet50_ours --cpu-smoke ...     (checks the plumbing on a CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_TFLOPS = 790.0
LOG_EVERY_STEPS = 10
GFLOP_PER_SAMPLE = {"resnet50": 24.3, "clip_b32": 44.2}


def profile_window(steps: int) -> tuple[int, int]:
    """The steps profiled: 4 steps from half-way (warm, as run.profile_steps does for ours)."""
    first = max(2, steps // 2)
    return first, min(steps, first + 3)


def synthetic_torch(model_name: str, batch: int, steps: int, device: str, compile_model: bool,
                    profile_dir: Path | None = None) -> float:
    """Reference step: the plain PyTorch loop (timm's --torchcompile when compiled)."""
    import torch

    from pipeline.profiling import StepProfiler

    if device == "cuda":  # what timm's train.py and open_clip_train set
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if model_name == "resnet50":
        import timm

        model = timm.create_model("resnet50").to(device).to(memory_format=torch.channels_last)
        images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device=device)
        loss_fn = lambda: torch.nn.functional.cross_entropy(model(images), labels)  # noqa: E731
    else:
        import open_clip

        import yaml

        # The same architecture our recipe trains (laion400m_e32's is ViT-B-32-quickgelu).
        name = yaml.safe_load(Path("configs/clip_vit_b32.yaml").read_text())["model"]["name"]
        model = open_clip.create_model(name).to(device)
        images = torch.randn(batch, 3, 224, 224, device=device)
        texts = torch.randint(0, 49408, (batch, 77), device=device)
        clip_loss = open_clip.ClipLoss()

        def loss_fn():
            image, text, scale = model(images, texts)
            return clip_loss(image, text, scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    if compile_model:
        model.compile()
    timings = []
    profiler = StepProfiler(profile_window(steps), profile_dir or Path("profile"), torch.device(device),
                            enabled=profile_dir is not None)
    for step in range(steps):
        profiler.before_step(step + 1)  # steps counted from 1, as the trainer counts them
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= steps // 3:
            timings.append(time.perf_counter() - start)
        profiler.after_step(step + 1)
    return batch / statistics.median(timings)


def ours(model_name: str, shards: str, batch: int, steps: int, workers: int, cpu_smoke: bool,
         compile_model: bool, extra_set: list[str] = (), profile_dir: Path | None = None) -> dict:
    """Our loop (no Ray) on real shards; figures from the run's metrics.jsonl (after a third of the steps)."""
    # ResNet-50: the reference steps AdamW with CE, so ours does too (resnet50_sgd's data side, no
    # RandAugment/mixup); the a3 recipe's LAMB + BCE is another step.
    config = {"resnet50": "configs/resnet50_sgd.yaml", "clip_b32": "configs/clip_vit_b32.yaml"}[model_name]
    out = tempfile.mkdtemp(prefix="gpu_case_")
    overrides = [
        f"run.output_dir={out}", "run.name=case", f"run.log_every_steps={LOG_EVERY_STEPS}",
        f"data.train={shards}", "data.val=",
        f"data.batch_size_per_rank={batch}", "data.global_batch_size=null", f"data.num_workers_per_rank={workers}",
        "data.image_size_px=224", f"schedule.max_steps={steps}", "checkpoint.every_steps=0", "eval.at_end=false",
        "ray.num_workers=1", "data.randaugment=null", "data.mixup_alpha=0", "data.cutmix_alpha=0",
        "data.shuffle_buffer=1000", f"model.compile={str(compile_model).lower()}",
    ]
    if model_name == "resnet50":
        overrides += ["data.num_classes=1000", "optim.name=adamw", "optim.lr=0.001", "optim.label_smoothing=0"]
    else:
        overrides += ["eval.zeroshot=[]"]
    if cpu_smoke:
        overrides += ["deepspeed.precision=fp32", "model.name=" + ("resnet_nano" if model_name == "resnet50" else
                                                                     "clip-tiny-rn"), "data.image_size_px=32"]
    if profile_dir is not None:
        overrides.append("run.profile_steps=[{},{}]".format(*profile_window(steps)))
    overrides += list(extra_set)
    cmd = [sys.executable, "-m", "launch", "pretrain", "--no-ray", "--config", config]
    for override in overrides:
        cmd += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in (Path(out) / "case" / "metrics.jsonl").read_text().splitlines()] \
        if (Path(out) / "case" / "metrics.jsonl").is_file() else []
    if profile_dir is not None and (Path(out) / "case" / "profile").is_dir():
        shutil.copytree(Path(out) / "case" / "profile", profile_dir, dirs_exist_ok=True)
    # Rows whose window held a profiled step are slower by the profiler's own cost: left out.
    window = profile_window(steps) if profile_dir is not None else None  # no profile: every row counts
    rows = [r for r in rows if "train/samples_per_second" in r and r["step"] > steps // 3
            and not (window and window[0] <= r["step"] and r["step"] - LOG_EVERY_STEPS < window[1])]
    if result.returncode != 0 or not rows:
        return {"error": (result.stderr or result.stdout)[-2000:], "rc": result.returncode}
    return {"samples_per_second": statistics.median(r["train/samples_per_second"] for r in rows),
            "data_wait_fraction": statistics.median(r["train/data_wait_fraction"] for r in rows),
            "wall_seconds": time.perf_counter() - started}


def loader(shards: str, batch: int, workers: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "launch", "benchmark-data", "--config", "benchmarks/loader_clip_b32.yaml",
           "--data", shards, "--workers", str(workers), "--batch-size", str(batch), "--steps", str(steps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    return {"summary": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "",
            "rc": result.returncode, **({"error": result.stderr[-2000:]} if result.returncode else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", required=True,
                        choices=("resnet50_torch", "resnet50_ours", "clip_b32_torch", "clip_b32_ours", "loader"))
    parser.add_argument("--shards", default="/tmp/gpu_shards")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--set", action="append", default=[], help="extra config override for our cases")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ours: model.compile)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the plumbing only")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over 4 warm steps (pipeline/profiling.py): trace, top operators and "
                             "host syncs per step under <dir of --out>/profile_<case>/")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    model_name = args.case.rsplit("_", 1)[0]
    row: dict = {"case": args.case + ("_compiled" if args.compile else ""), "batch": args.batch,
                 "steps": args.steps, "device": device,
                 "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    profile_dir = Path(args.out).resolve().parent / f"profile_{row['case']}" if args.profile else None
    try:
        if args.case.endswith("_torch"):
            row["samples_per_second"] = synthetic_torch(model_name, args.batch, args.steps, device, args.compile,
                                                        profile_dir)
        elif args.case.endswith("_ours"):
            row.update(ours(model_name, args.shards, args.batch, args.steps, args.workers, args.cpu_smoke,
                            args.compile, args.set, profile_dir))
            row["overrides"] = args.set
        else:
            row.update(loader(args.shards, args.batch, args.workers, args.steps))
    except Exception as err:  # one failed case must not lose the others' lines
        row["error"] = f"{type(err).__name__}: {err}"
    if profile_dir is not None and (profile_dir / "summary.json").is_file():
        row["profile"] = json.loads((profile_dir / "summary.json").read_text())
    if "samples_per_second" in row and model_name in GFLOP_PER_SAMPLE:
        row["mfu"] = row["samples_per_second"] * GFLOP_PER_SAMPLE[model_name] / (PEAK_TFLOPS * 1000)
    write_row(args.out, row)
    return 0


def write_row(out: str, row: dict) -> None:
    """Append a case's JSON line to the file gpu.sh returns, and print it."""
    with open(out, "a") as sink:
        sink.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
