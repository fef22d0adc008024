"""The step plan (pipeline.trainer.make_plan) and the generated DeepSpeed JSON (pipeline.engine.deepspeed_config),
against values written out here by hand."""
from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.engine import deepspeed_config
from pipeline.trainer import StepPlan, make_plan

DIGITS_TRAIN = 1437  # samples in the digits corpus's labelled/train


def config(**sections: dict) -> Config:
    return Config.from_dict({"data": {"train": "/data/train", **sections.pop("data", {})}, **sections})


@pytest.mark.parametrize("sections, world, plan", [
    # 32 x 2 accumulation x 2 ranks = 128 per step; 1437 // 128 = 11 steps/epoch; 12 epochs; 1 warmup epoch.
    ({"data": {"batch_size_per_rank": 32}, "deepspeed": {"gradient_accumulation_steps": 2},
      "schedule": {"epochs": 12, "warmup_epochs": 1}}, 2, StepPlan(11, 132, 11, 128)),
    # Fractional epochs round the step count up (2.5 x 22 = 55), warmup to the nearest step (0.3 x 22 = 6.6).
    ({"data": {"batch_size_per_rank": 16}, "schedule": {"epochs": 2.5, "warmup_epochs": 0.3}}, 4,
     StepPlan(22, 55, 7, 64)),
    # max_steps caps the total, not the epoch length or the warmup.
    ({"data": {"batch_size_per_rank": 8}, "deepspeed": {"gradient_accumulation_steps": 4},
      "schedule": {"epochs": 10, "warmup_epochs": 1, "max_steps": 20}}, 1, StepPlan(44, 20, 44, 32)),
])
def test_make_plan(sections, world, plan):
    assert make_plan(config(**sections), DIGITS_TRAIN, world) == plan


def test_make_plan_refuses_fewer_samples_than_one_global_batch():
    cfg = config(data={"batch_size_per_rank": 64}, deepspeed={"gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match=r"data.train: 255 samples are fewer than one global batch \(256\)"):
        make_plan(cfg, 255, 2)
    assert make_plan(cfg, 256, 2).steps_per_epoch == 1


COMMON = {"zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
          "timers": {"throughput": {"enabled": False, "synchronized": False}}}


def test_deepspeed_json_on_the_cpu_in_fp32():
    cfg = config(deepspeed={"zero_stage": 1, "gradient_accumulation_steps": 3, "precision": "auto"},
                 optim={"name": "sgd", "grad_clip_norm": 2.5})
    assert deepspeed_config(cfg.deepspeed, cfg.optim, 24, on_gpu=False) == {
        "train_micro_batch_size_per_gpu": 24, "gradient_accumulation_steps": 3,
        "zero_optimization": {"stage": 1, "contiguous_gradients": False}, "gradient_clipping": 2.5, **COMMON}


def test_deepspeed_json_on_a_gpu_autocasts_bf16_and_reduces_in_fp32():
    cfg = config(deepspeed={"zero_stage": 2, "precision": "auto"}, optim={"name": "adamw"})
    assert deepspeed_config(cfg.deepspeed, cfg.optim, 64, on_gpu=True) == {
        "train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}, **COMMON}
    # comm_dtype bf16: DeepSpeed's own default, Linear/Conv gradients reduced in bf16 (no override).
    cfg = config(deepspeed={"zero_stage": 2, "precision": "bf16", "comm_dtype": "bf16"}, optim={"name": "adamw"})
    assert deepspeed_config(cfg.deepspeed, cfg.optim, 64, on_gpu=True)["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16"}


def test_deepspeed_json_lamb_clips_at_one_fp16_scales_and_extra_merges_last():
    cfg = config(deepspeed={"zero_stage": 0, "precision": "fp16",
                            "extra": {"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 10}},
                 optim={"name": "lamb", "grad_clip_norm": 3.0})
    assert deepspeed_config(cfg.deepspeed, cfg.optim, 8, on_gpu=True) == {
        **COMMON, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0, "contiguous_gradients": True, "reduce_bucket_size": 1000},
        "gradient_clipping": 1.0,  # LAMB as timm trains it clips at 1.0 whatever the config asks above it
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}, "steps_per_print": 10}
