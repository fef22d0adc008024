"""Memory goal (issue 8, goal 4): optimizer state bytes per rank under ZeRO-0 vs ZeRO-2.

    .venv/bin/python benchmarks/zero_memory.py [--out /tmp/bench/results/zero_memory.jsonl]

Two ranks on this CPU over gloo, the project's engine (pipeline.engine.deepspeed_config + initialize),
AdamW through pipeline.optim, fp32, model resnet_tiny (4.9M params). After 3 steps (state allocated) each
rank counts, from the optimizer DeepSpeed steps:
  * adam_state_bytes: every tensor in the torch optimizer's `state` (exp_avg, exp_avg_sq, step);
  * master_bytes: ZeRO's own fp32 partition of the weights (single_partition_of_fp32_groups), which
    stage 0 does not have (the model's fp32 weights are the master copy there);
then saves a checkpoint and lists the optimizer files each rank wrote (ZeRO-0 keeps the optimizer in
rank 0's mp_rank_00_model_states.pt; ZeRO-2 writes one zero_pp_rank_R_mp_rank_00_optim_states.pt per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def measure(stage: int, rank: int, out_dir: Path) -> dict:
    from pipeline.config import DeepSpeedSection, ModelSection, OptimSection
    from pipeline.engine import deepspeed_config, initialize
    from pipeline.models import build_classifier
    from pipeline.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = build_classifier(ModelSection(name="resnet_tiny"), 10)
    num_params = sum(p.numel() for p in model.parameters())
    optim_cfg = OptimSection(name="adamw", lr=1e-3, weight_decay=0.05)
    optimizer = build_optimizer(param_groups(model, optim_cfg.weight_decay), optim_cfg)
    ds_config = deepspeed_config(DeepSpeedSection(zero_stage=stage, precision="fp32"), optim_cfg, 16, on_gpu=False)
    engine = initialize(model, optimizer, None, ds_config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        images, labels = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()
    ds_optimizer = engine.optimizer
    torch_optimizer = getattr(ds_optimizer, "optimizer", ds_optimizer)  # ZeRO wraps the client optimizer
    adam_bytes = sum(tensor_bytes(state) for state in torch_optimizer.state.values())
    master_bytes = tensor_bytes(getattr(ds_optimizer, "single_partition_of_fp32_groups", []))
    ckpt = out_dir / f"zero{stage}"
    engine.save_checkpoint(str(ckpt), tag="step3")
    dist.barrier()
    files = {}
    for path in sorted((ckpt / "step3").glob("*.pt")):
        files[path.name] = path.stat().st_size
    return {"zero_stage": stage, "rank": rank, "num_params": num_params, "adam_state_bytes": adam_bytes,
            "master_bytes": master_bytes, "optimizer_type": type(ds_optimizer).__name__, "checkpoint_files": files}


def worker(rank: int, world: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for stage in (0, 2):
        queue.put(measure(stage, rank, Path(out_dir)))
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    from pipeline.trainer import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/bench/results/zero_memory.jsonl")
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="zero_memory_") as tmp:
        mp.start_processes(worker, args=(2, free_port(), tmp, queue), nprocs=2, join=True, start_method="spawn")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    rows.sort(key=lambda r: (r["zero_stage"], r["rank"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
            print(json.dumps(row))
    print("\n| ZeRO stage | rank | Adam moments (MB) | + ZeRO fp32 master partition (MB) | optimizer checkpoint files (MB) |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        files = ", ".join(f"{name} {size / 1e6:.1f}" for name, size in row["checkpoint_files"].items())
        print(f"| {row['zero_stage']} | {row['rank']} | {row['adam_state_bytes'] / 1e6:.2f} | "
              f"{(row['adam_state_bytes'] + row['master_bytes']) / 1e6:.2f} | {files} |")
    by_stage = {s: [r for r in rows if r["zero_stage"] == s] for s in (0, 2)}
    adam = {s: max(r["adam_state_bytes"] for r in by_stage[s]) for s in (0, 2)}
    print(f"\nAdam moments per rank, ZeRO-2 / ZeRO-0 = {adam[2] / adam[0]:.3f} "
          f"({adam[2] / 1e6:.2f} MB vs {adam[0] / 1e6:.2f} MB, largest rank)")


if __name__ == "__main__":
    main()
