"""Step-overhead goal (issue 8, goal 2): our training step through DeepSpeed vs a bare PyTorch DDP loop,
same model, same batches, same processes.

    .venv/bin/python benchmarks/step_overhead.py [--steps 40] [--warmup 10] [--rounds 2] [--profile]

Two ranks on this CPU over gloo (torch.multiprocessing, 127.0.0.1), one intra-op thread per rank. Model:
the project's resnet_tiny (timm ResNet, BasicBlock [1,1,1,1], 4.9M params), 10 classes, batch 64 per rank at
32 px, fp32, SGD (momentum 0.9, nesterov) through pipeline.optim. Cases, interleaved in `--rounds` rounds:

  ddp         torch DistributedDataParallel: forward, CrossEntropy, backward, optimizer.step, zero_grad
  zero0/zero2 the project's engine (pipeline.engine.deepspeed_config + initialize; pipeline.optim), step as
              pipeline/trainer.py runs it: seed_sample_rng per micro-step, loss, engine.backward,
              engine.step, loss accumulated on the device
  (+ --extra)  the same DeepSpeed steps with DeepSpeed settings proposed as fixes (see --extra-case)

Figure: median step time over the timed steps (rank 0's clock; each step ends in collective work, so
ranks stay in step), and its ratio to ddp; also rank 0's process CPU time per step (all its threads,
gloo's included), the figure that other people's load on a shared machine moves least. --profile adds a cProfile of zero2 steps on rank 0 (top
functions by own time) to explain where the extra time goes. Prints JSON lines and a Markdown table.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

BATCH, PIXELS, CLASSES, NUM_BATCHES = 64, 32, 10, 8

# Extra DeepSpeed settings measured as candidate fixes (merged through deepspeed.extra, as a user would).
EXTRA_CASES: dict[str, tuple[int, dict]] = {
    "zero2+overlap": (2, {"zero_optimization": {"overlap_comm": True}}),
    "zero2+no-contig": (2, {"zero_optimization": {"contiguous_gradients": False}}),
    "zero2+allreduce": (2, {"zero_optimization": {"reduce_scatter": False}}),
    # Reduce each gradient slice to its owner instead of all-reducing the whole bucket: with the
    # parameter all-gather after the step, the traffic of one all-reduce, as DDP has.
    "zero2+reduce": (2, {"zero_optimization": {"use_multi_rank_bucket_allreduce": False}}),
}


def build(cfg_optim, seed: int = 0):
    from pipeline.config import ModelSection
    from pipeline.models import build_classifier
    from pipeline.optim import build_optimizer, param_groups

    torch.manual_seed(seed)
    model = build_classifier(ModelSection(name="resnet_tiny"), CLASSES)
    return model, build_optimizer(param_groups(model, cfg_optim.weight_decay), cfg_optim)


def batches_for(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(BATCH, 3, PIXELS, PIXELS, generator=generator),
             torch.randint(0, CLASSES, (BATCH,), generator=generator)) for _ in range(NUM_BATCHES)]


def ddp_steps(batches, cfg_optim, count: int) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel

    model, optimizer = build(cfg_optim)
    model = DistributedDataParallel(model)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for step in range(count):
        images, labels = batches[step % len(batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def deepspeed_steps(batches, cfg_optim, count: int, zero_stage: int, extra: dict, rank: int,
                    profile_from: int | None = None) -> tuple[list[float], str | None]:
    from pipeline.config import DeepSpeedSection
    from pipeline.data.stream import seed_sample_rng
    from pipeline.engine import deepspeed_config, initialize

    model, optimizer = build(cfg_optim)
    ds_config = deepspeed_config(DeepSpeedSection(zero_stage=zero_stage, precision="fp32", extra=extra),
                                 cfg_optim, BATCH, on_gpu=False)
    engine = initialize(model, optimizer, None, ds_config)
    engine.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_sum = torch.zeros(())
    times, profiler = [], None
    for step in range(count):
        if profile_from is not None and step == profile_from:
            profiler = cProfile.Profile()
            profiler.enable()
        images, labels = batches[step % len(batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        seed_sample_rng(0, step * 1000, -1 - rank)  # as pipeline/trainer.py does before each micro-step
        loss = loss_fn(engine(images).float(), labels)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    report = None
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        report = text.getvalue()
    engine.destroy() if hasattr(engine, "destroy") else None
    return times, report


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from pipeline.config import OptimSection

    cfg_optim = OptimSection(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = batches_for(rank)
    count = args.warmup + args.steps
    cases = ["ddp", "zero0", "zero2", *args.extra_case]
    for round_index in range(args.rounds):
        for case in cases:
            dist.barrier()
            report = None
            if case == "ddp":
                times = ddp_steps(batches, cfg_optim, count)
            else:
                stage, extra = (int(case[-1]), {}) if case in ("zero0", "zero2") else EXTRA_CASES[case]
                profile = args.profile and case == "zero2" and round_index == args.rounds - 1 and rank == 0
                times, report = deepspeed_steps(batches, cfg_optim, count, stage, extra, rank,
                                                profile_from=args.warmup if profile else None)
            timed = times[args.warmup:]
            if rank == 0:
                wall, cpu = [t[0] for t in timed], [t[1] for t in timed]
                queue.put({"case": case, "round": round_index, "median_ms": 1000 * statistics.median(wall),
                           "mean_ms": 1000 * statistics.fmean(wall), "cpu_median_ms": 1000 * statistics.median(cpu),
                           "steps": len(timed),
                           "load_avg_1min": os.getloadavg()[0], **({"profile": report} if report else {})})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    from pipeline.trainer import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--extra-case", nargs="*", default=[], choices=sorted(EXTRA_CASES))
    parser.add_argument("--out", default="/tmp/bench/results/step_overhead.jsonl")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(worker, args=(2, free_port(), args, queue), nprocs=2, join=True, start_method="spawn")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as sink:
        for row in rows:
            profile = row.pop("profile", None)
            sink.write(json.dumps(row) + "\n")
            print(json.dumps(row))
            if profile:
                print(profile)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    medians = {c: statistics.median(r["median_ms"] for r in rows if r["case"] == c) for c in cases}
    cpu = {c: statistics.median(r["cpu_median_ms"] for r in rows if r["case"] == c) for c in cases}
    print("\n| case | median step ms (median over rounds) | per-round medians | vs ddp | CPU ms per step (rank 0) | vs ddp |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for case in cases:
        per_round = ", ".join(f"{r['median_ms']:.1f}" for r in rows if r["case"] == case)
        print(f"| {case} | {medians[case]:.1f} | {per_round} | {medians[case] / medians['ddp']:.2f}x | "
              f"{cpu[case]:.1f} | {cpu[case] / cpu['ddp']:.2f}x |")


if __name__ == "__main__":
    main()
