"""model.compile (issue 15): compiled steps under DeepSpeed give eager's losses; a compiled run resumes.

Runs the plain-process entry (`launch pretrain --no-ray`, world size 1) so inductor's CPU compile is the
only cost; ZeRO-2 keeps DeepSpeed's gradient hooks in the path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")


def pretrain_no_ray(out: Path, digits_root: Path, name: str, *extra: str,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`launch pretrain --no-ray` in a subprocess, with this process's environment unless `env` is given."""
    overrides = [
        f"run.output_dir={out}", f"run.name={name}", "run.log_every_steps=1",
        f"data.train={digits_root}/labelled/train", f"data.val={digits_root}/labelled/val",
        "data.batch_size_per_rank=16", "data.num_workers_per_rank=1", "data.image_size_px=16",
        "model.name=resnet_nano", "optim.lr=0.05", "schedule.warmup_epochs=0", "schedule.max_steps=6",
        "checkpoint.every_steps=3", "deepspeed.zero_stage=2", "ray.num_workers=1", "eval.at_end=false",
        *extra,
    ]
    cmd = [sys.executable, "-m", "launch", "pretrain", "--no-ray", "--config", SMOKE]
    for override in overrides:
        cmd += ["--set", override]
    env = {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def eager_and_compiled(digits_root, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """The eager run's losses and the compiled run's folder: the two train side by side (independent runs;
    the eager one is mostly start-up, one core's worth, while inductor compiles)."""
    out = tmp_path_factory.mktemp("eager")
    with ThreadPoolExecutor(1) as pool:
        eager = pool.submit(pretrain_no_ray, out, digits_root, "eager")
        compiled = pretrain_no_ray(out, digits_root, "compiled", "model.compile=true")
        result = eager.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    return losses(out / "eager"), out / "compiled"


@pytest.fixture(scope="module")
def eager_losses(eager_and_compiled) -> dict[int, float]:
    return eager_and_compiled[0]


def test_compiled_steps_match_eager(eager_and_compiled):
    eager_losses, compiled_dir = eager_and_compiled
    compiled = losses(compiled_dir)
    assert sorted(compiled) == sorted(eager_losses) == [1, 2, 3, 4, 5, 6]
    for step, loss in eager_losses.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-3, abs=1e-4), (step, compiled, eager_losses)
    # Checkpoint keys stay plain (nn.Module.compile in place): no '_orig_mod.' prefix for eval/export.
    import torch

    states = torch.load(next(compiled_dir.rglob("mp_rank_00_model_states.pt")), weights_only=False)
    assert not any("_orig_mod" in key for key in states["module"])


def test_compiled_run_resumes_after_a_kill(eager_losses, digits_root, tmp_path):
    # The fault drill kills the process at step 5; the checkpoint of step 3 is the latest complete one.
    killed = pretrain_no_ray(tmp_path, digits_root, "resumed", "model.compile=true", "run.inject_failure_at_step=5")
    assert killed.returncode == 17, killed.stderr[-3000:]
    resumed = pretrain_no_ray(tmp_path, digits_root, "resumed", "model.compile=true",
                              "run.inject_failure_at_step=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    after = losses(tmp_path / "resumed")
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(eager_losses[step], rel=1e-3, abs=1e-4), (step, after, eager_losses)


def test_compile_refused_under_zero3():
    from pipeline.config import Config, ConfigError

    with pytest.raises(ConfigError, match="model.compile"):
        Config.from_dict({"data": {"train": "x"}, "model": {"compile": True}, "deepspeed": {"zero_stage": 3}})
