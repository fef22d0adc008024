"""How long a checkpoint stalls training: run directory on local disk vs in a bucket (background upload).

    .venv/bin/python benchmarks/checkpoint_upload.py --model resnet50 --saves 3 --steps-between 8

One process, one real DeepSpeed engine (gloo, world size 1) training a timm model on random images; every
`--steps-between` steps the trainer's own save path runs (pipeline/trainer.py `Trainer.save`: RunMirror
.before_save, checkpoint.save, RunMirror.after_save). "Stall" is the wall time training is blocked per save.
The bucket is a real S3 API server (moto's server mode) in its own process on 127.0.0.1. Also measured:
the same upload done synchronously (save, then wait for the upload), which is what a trainer without the
background upload would block for. Prints one JSON line per mode and a Markdown table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_s3_server() -> subprocess.Popen:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the S3 server did not start")


def _engine(model_name: str, zero_stage: int):
    import timm

    from pipeline.config import DeepSpeedSection, OptimSection
    from pipeline.engine import deepspeed_config, initialize
    from pipeline.optim import build_optimizer, param_groups

    optim_cfg = OptimSection(name="adamw", lr=1e-3, weight_decay=0.05)
    model = timm.create_model(model_name, num_classes=100)
    optimizer = build_optimizer(param_groups(model, optim_cfg.weight_decay), optim_cfg)
    ds_cfg = DeepSpeedSection(zero_stage=zero_stage, precision="fp32")
    return initialize(model, optimizer, None, deepspeed_config(ds_cfg, optim_cfg, 8, False))


def _train_steps(engine, steps: int, image_px: int) -> None:
    for _ in range(steps):
        images = torch.randn(8, 3, image_px, image_px)
        labels = torch.randint(0, 100, (8,))
        engine.backward(torch.nn.functional.cross_entropy(engine(images), labels))
        engine.step()


def _run(mode: str, args, output_dir: str) -> dict:
    from pipeline import checkpoint
    from pipeline.config import load_config
    from pipeline.run_mirror import RunMirror

    cfg = load_config(REPO / "configs" / "smoke_resnet.yaml",
                      [f"run.output_dir={output_dir}", f"run.name=ckpt_{mode}", "checkpoint.keep_last=2",
                       f"deepspeed.zero_stage={args.zero_stage}"])
    engine = _engine(args.model, args.zero_stage)
    mirror = RunMirror(cfg, rank=0, world_size=1, local_rank=0)
    meta = {"config": cfg.to_dict(), "zero_stage": args.zero_stage, "world_size": 1}
    stalls, step = [], 0
    _train_steps(engine, 2, args.image_px)  # warm-up, outside the clock
    started = time.perf_counter()
    for _ in range(args.saves):
        _train_steps(engine, args.steps_between, args.image_px)
        step += args.steps_between
        blocked = time.perf_counter()
        mirror.before_save(step)  # what Trainer.save does, in its order
        ckpt_dir = checkpoint.save(engine, cfg.run_dir, step, meta, {"step": step}, is_rank0=True)
        mirror.after_save(ckpt_dir, meta)
        if mode == "bucket_synchronous":
            mirror.wait()
        checkpoint.apply_retention(cfg.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        stalls.append(time.perf_counter() - blocked)
    mirror.wait()  # the end of a run waits for the last upload too
    total = time.perf_counter() - started
    size = sum(p.stat().st_size for p in ckpt_dir.iterdir() if p.is_file())
    return {"mode": mode, "model": args.model, "zero_stage": args.zero_stage, "checkpoint_mb": round(size / 2**20, 1),
            "saves": args.saves, "steps_between": args.steps_between,
            "stall_seconds_median": round(statistics.median(stalls), 3), "stall_seconds": [round(s, 3) for s in stalls],
            "total_seconds": round(total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--steps-between", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=96)
    args = parser.parse_args()

    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", RESCLIP_CACHE=tempfile.mkdtemp(prefix="ckpt_bench_cache_"))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    server = _start_s3_server()
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("ckpt-bench")
        rows = [_run("local", args, tempfile.mkdtemp(prefix="ckpt_bench_")),
                _run("bucket_background", args, "s3://ckpt-bench/runs"),
                _run("bucket_synchronous", args, "s3://ckpt-bench/runs")]
    finally:
        server.terminate()
    for row in rows:
        print(json.dumps(row))
    print("\n| run directory | checkpoint MB | stall per save, median (s) | total for "
          f"{args.saves}x({args.steps_between} steps + save) (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['checkpoint_mb']} | {row['stall_seconds_median']} | {row['total_seconds']} |")


if __name__ == "__main__":
    main()
