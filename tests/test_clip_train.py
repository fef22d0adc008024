"""The smoke CLIP end to end: 2 Ray workers, DeepSpeed ZeRO-2, gathered CLIP loss, zero-shot and
retrieval evaluation in metrics.jsonl, checkpoint and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.prepare import write_run_record
from launch.pretrain import prepared_config, run_on_ray
from pipeline import checkpoint

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_clip.yaml")


def overrides(out: Path, digits: Path, **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": "tiny_clip", "run.log_every_steps": 10,
        "data.train": f"{digits}/image_text/train", "data.val": f"{digits}/image_text/val",
        "eval.zeroshot": f"[digits={digits}/zeroshot]", "schedule.max_steps": 60, "schedule.warmup_epochs": 0.5,
        "eval.every_steps": 30, "checkpoint.every_steps": 30, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def launch(args: list[str]) -> tuple[dict, Path]:
    cfg = prepared_config(SMOKE, args)
    write_run_record(cfg, SMOKE)
    final = run_on_ray(cfg, address=None)
    assert final, "training failed"
    return final, cfg.run_dir


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clip_run(ray_session, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_runs")
    final, run_dir = launch(overrides(out, digits_root))
    return out, final, run_dir


def test_two_worker_clip_learns_and_logs_zero_shot(clip_run):
    _, final, run_dir = clip_run
    train = [r for r in rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 1.0, [r["train/loss"] for r in train]
    evals = [r for r in rows(run_dir) if "val/zeroshot/digits/acc1" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert final["val/zeroshot/digits/samples"] == 360 and final["val/samples"] == 360  # each sample once
    assert final["val/zeroshot/digits/acc1"] > 0.3, final  # chance: 0.1
    assert 0 < final["val/image_retrieval_recall@10"] <= 1 and final["val/loss"] > 0
    # validation and training numbers are told apart by their prefix, in TensorBoard as in metrics.jsonl
    assert not any(key.startswith("train/val") or key.startswith("val_") for row in rows(run_dir) for key in row)
    meta = checkpoint.read_meta(run_dir / "checkpoints" / "step_00000060")
    assert meta["config"]["model"]["kind"] == "clip" and meta["world_size"] == 2


def test_clip_relaunch_resumes_at_the_next_step(clip_run, digits_root):
    out, _, run_dir = clip_run
    before = len(rows(run_dir))
    final, _ = launch(overrides(out, digits_root, **{"schedule.max_steps": 70, "eval.every_steps": 0}))
    new = [r for r in rows(run_dir)[before:] if "train/loss" in r]
    assert [r["step"] for r in new] == [70] and final["step"] == 70
    assert new[0]["train/loss"] < rows(run_dir)[0]["train/loss"] - 1.0  # continued from the trained weights
    assert "val/zeroshot/digits/acc1" in final


def test_our_clip_checkpoint_evaluates_and_exports_like_training_saw_it(clip_run, digits_root, tmp_path):
    import open_clip

    from pipeline.evaluation.export import export
    from pipeline.evaluation.resolver import resolve
    from pipeline.evaluation.tasks import EvalOptions, evaluate

    _, _, run_dir = clip_run
    final = json.loads((run_dir / "final_metrics.json").read_text())  # the latest run's own zero-shot
    resolved = resolve(str(run_dir))  # ZeRO-2 shards of 2 ranks -> a plain open_clip model
    assert resolved.kind == "clip" and resolved.step == final["step"]
    options = EvalOptions(batch_size=64, num_workers=0, device="cpu")
    result = evaluate("zeroshot", resolved, Path(f"{digits_root}/zeroshot"), options)
    assert abs(result["metrics"]["acc1"] - final["val/zeroshot/digits/acc1"]) <= 1 / 360 + 1e-9
    # exported in open_clip's format, it loads in open_clip itself
    weights, config = export(resolved, "open_clip", tmp_path / "clip.bin")
    open_clip.add_model_config(str(config))
    model = open_clip.create_model("clip-tiny-rn", pretrained=str(weights))
    assert model.logit_scale.ndim == 0 and torch.allclose(model.logit_scale, resolved.model.logit_scale)
