"""DeepSpeed engine from the typed config: the DeepSpeed JSON is generated, never hand-written, so a
batch size lives in one place (data.batch_size_per_rank)."""
from __future__ import annotations

import torch

from pipeline.lamb import bind_zero_layout
from pipeline.optim import grad_clip_norm
from pipeline.precision import resolve_precision


def deepspeed_config(ds_cfg, optim_cfg, batch_size_per_rank: int, on_gpu: bool) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": batch_size_per_rank,
        "gradient_accumulation_steps": ds_cfg.gradient_accumulation_steps,
        # On CPU, copying each gradient into a contiguous bucket from Python hooks cost ~11 ms of a
        # 128 ms ZeRO-2 step (benchmarks/RESULTS.md); on GPU the copy is cheap and saves fragmentation.
        "zero_optimization": {"stage": ds_cfg.zero_stage, "contiguous_gradients": on_gpu},
        # Our client optimizers (SGD, LAMB) are fine under ZeRO; DeepSpeed refuses them without this.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on and synchronized by default: a device synchronize at every
        # forward's start and every step's end, so the host never queues the next step while the GPU runs this
        # one and each step pays its Python and kernel-launch time on top (tests/test_engine_syncs.py). Nothing
        # reads it (steps_per_print above); our own throughput comes from the log window.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if grad_clip_norm(optim_cfg):
        config["gradient_clipping"] = grad_clip_norm(optim_cfg)
    precision = resolve_precision(ds_cfg.precision, on_gpu)
    if precision == "bf16":
        # fp32 weights + autocast: ResNet-50 on an H100 ran at 0.84x of a plain PyTorch autocast step, against
        # 0.66x in DeepSpeed's bf16-weights mode (3,355 and 2,630 vs 3,985 img/s), and BatchNorm stays in fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if ds_cfg.comm_dtype == "fp32":
            # DeepSpeed tags Linear/Conv weights (its "lower precision safe modules") with the autocast
            # dtype as their gradient communication dtype, so most gradients would be bucketed, pre-divided
            # and all-reduced in bf16. No tagged module: every gradient is reduced in its own dtype, fp32.
            config["torch_autocast"]["lower_precision_safe_modules"] = []
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _merge(config, ds_cfg.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# DeepSpeed < 0.19.8 bucketed ZeRO-1/2 gradients by legacy type strings ("torch.cpu.FloatTensor") that no
# CPU tensor has, so on CPU every bucket was dropped and ranks never averaged their gradients: each rank
# silently trained on its own shard (caught by tests/test_lamb_zero.py when pip resolved 0.19.7).
FIRST_DEEPSPEED_REDUCING_CPU_ZERO_GRADS = "0.19.8"


def check_zero_reduces_gradients(deepspeed_version: str, zero_stage: int, world_size: int,
                                 accelerator: str) -> None:
    from packaging.version import Version

    if accelerator != "cpu" or world_size == 1 or zero_stage not in (1, 2):
        return
    if Version(deepspeed_version) < Version(FIRST_DEEPSPEED_REDUCING_CPU_ZERO_GRADS):
        raise RuntimeError(
            f"DeepSpeed {deepspeed_version} does not all-reduce ZeRO-{zero_stage} gradients on CPU, so the "
            f"{world_size} ranks would each train on their own data; install "
            f"deepspeed>={FIRST_DEEPSPEED_REDUCING_CPU_ZERO_GRADS} (pip install -U deepspeed)")


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    check_zero_reduces_gradients(deepspeed.__version__, ds_config["zero_optimization"]["stage"],
                                 dist.get_world_size() if dist.is_initialized() else 1,
                                 get_accelerator().device_name())
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    bind_zero_layout(engine)  # LAMB's trust ratios stay per tensor inside ZeRO's flat partitions
    return engine
