"""Training paths that had no test of their own: gradient accumulation, ZeRO stages 1 and 3 with their
consolidation, the plain-process entry (`launch pretrain --no-ray`) and `launch report` on a real run.

Every run here is `launch pretrain --no-ray` (world size 1, fp32 on the CPU) in a subprocess. The model is
timm's `test_convnext` (LayerNorm, no BatchNorm, no buffers): its gradient on 16 samples does not depend on
how they are split into micro-batches, so accumulation and the ZeRO stages can be compared weight for weight
against one plain ZeRO-0 run. (With BatchNorm, two micro-batches of 8 normalise over 8 samples each and the
weights would rightly differ.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from test_compile import pretrain_no_ray

STEPS = 4  # checkpoint.every_steps=3 in pretrain_no_ray: checkpoints at steps 3 and 4
LR = 0.05  # pretrain_no_ray's optim.lr; warmup 0, cosine over STEPS steps
NO_BN = ("model.name=test_convnext", "data.num_workers_per_rank=0", "data.image_size_px=32",
         f"schedule.max_steps={STEPS}", "deepspeed.precision=fp32")


def train(out: Path, digits_root: Path, name: str, *extra: str) -> Path:
    result = pretrain_no_ray(out, digits_root, name, *NO_BN, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / name


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_checkpoint(run_dir: Path) -> Path:
    return checkpoint.checkpoints_root(run_dir) / checkpoint.step_tag(STEPS)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory) -> Path:
    """ZeRO-0, 16 samples per step in one micro-batch: its model-states file is the module's state dict."""
    # Steps 2-3 profiled (run.profile_steps): the profiler observes and must not change a weight (the ZeRO and
    # accumulation runs compared with this one are not profiled).
    return train(tmp_path_factory.mktemp("reference"), digits_root, "reference", "data.batch_size_per_rank=16",
                 "deepspeed.zero_stage=0", "deepspeed.gradient_accumulation_steps=1", "run.profile_steps=[2,3]")


@pytest.fixture(scope="module")
def reference_weights(reference) -> dict[str, torch.Tensor]:
    blob = checkpoint.safe_torch_load(last_checkpoint(reference) / checkpoint.MODEL_STATES_FILE,
                                      deepspeed_state=True)
    return {k: v.float() for k, v in blob["module"].items()}


def test_no_ray_run_writes_a_complete_checkpoint_and_its_record(reference, reference_weights):
    # The plain-process entry: one rank, its complete checkpoints, metrics and final numbers.
    meta = checkpoint.read_meta(last_checkpoint(reference))
    assert (meta["step"], meta["zero_stage"], meta["world_size"]) == (STEPS, 0, 1)
    assert [p.name for p in checkpoint.list_complete(reference)] == [checkpoint.step_tag(3),
                                                                     checkpoint.step_tag(STEPS)]
    assert [r["step"] for r in rows(reference) if "train/loss" in r] == [1, 2, 3, 4]
    final = json.loads((reference / "final_metrics.json").read_text())
    assert final["step"] == STEPS and final["train/loss"] == rows(reference)[-1]["train/loss"]
    # 1,437 training digits / 16 per step = 89 whole steps per epoch.
    assert rows(reference)[-1]["epoch"] == round(STEPS / 89, 3)
    # The state dict is the model's own: timm's test_convnext, 10 classes, trained away from its init.
    import timm

    fresh = timm.create_model("test_convnext", num_classes=10).state_dict()
    assert sorted(reference_weights) == sorted(fresh)
    assert any(not torch.equal(reference_weights[k], fresh[k].float()) for k in fresh)


def test_profile_steps_write_a_trace_top_operators_and_a_summary(reference):
    profile = reference / "profile"
    summary = json.loads((profile / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0 and summary["host_cpu_ms_per_step"] > 0
    assert summary["host_syncs_per_step"] == 0  # no device here: nothing to wait for
    ops = (profile / "top_ops.txt").read_text()
    assert "by self CPU time, 2 steps" in ops and "aten::convolution_backward" in ops
    trace = json.loads((profile / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::convolution_backward" in names  # the step's backward is inside the window


def test_gradient_accumulation_of_two_equals_one_batch_twice_the_size(reference, reference_weights,
                                                                      digits_root, tmp_path):
    run = train(tmp_path, digits_root, "accumulated", "data.batch_size_per_rank=8", "deepspeed.zero_stage=0",
                "deepspeed.gradient_accumulation_steps=2")
    # 8 x 2 = 16 samples per optimizer step: the same step plan, the same samples, the same gradients.
    meta = checkpoint.read_meta(last_checkpoint(run))
    assert meta["config"]["deepspeed"]["gradient_accumulation_steps"] == 2
    assert meta["config"]["data"]["batch_size_per_rank"] == 8 and meta["step"] == STEPS
    assert rows(run)[-1]["epoch"] == round(STEPS / 89, 3)
    # One scheduler step per optimizer step (not per micro-batch): cosine from LR to 0 over 4 steps.
    lrs = [r["train/lr"] for r in rows(run) if "train/lr" in r]
    assert lrs == pytest.approx([0.5 * LR * (1 + math.cos(math.pi * s / STEPS)) for s in range(1, STEPS + 1)])
    assert lrs == [r["train/lr"] for r in rows(reference) if "train/lr" in r]
    blob = checkpoint.safe_torch_load(last_checkpoint(run) / checkpoint.MODEL_STATES_FILE, deepspeed_state=True)
    assert blob["data_position"]["offset"] == STEPS * 16  # both micro-batches of every step were read
    weights = {k: v.float() for k, v in blob["module"].items()}
    # Sums of 16 vs of 2 x 8 differ by rounding only (1e-8 seen); 4 steps move weights by ~2e-2.
    assert_same_weights(weights, reference_weights, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_consolidates_to_the_full_state_dict(stage, reference_weights, digits_root,
                                                                   tmp_path):
    run = train(tmp_path, digits_root, f"zero{stage}", "data.batch_size_per_rank=16",
                f"deepspeed.zero_stage={stage}", "deepspeed.gradient_accumulation_steps=1")
    ckpt = last_checkpoint(run)
    meta = checkpoint.read_meta(ckpt)
    assert (meta["zero_stage"], meta["world_size"]) == (stage, 1)
    assert sorted(p.name for p in ckpt.glob("*.pt")) == sorted(checkpoint.expected_files(meta))
    # The consolidated fp32 weights are the ZeRO-0 run's: the stage changes where state lives, not the math.
    weights, _ = checkpoint.load_consolidated(ckpt)
    assert_same_weights(weights, reference_weights, atol=1e-6)
    # `launch export` writes the same full state dict.
    from safetensors.torch import load_file

    from launch.cli import main

    output = tmp_path / "export.safetensors"
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--output", str(output)]) == 0
    assert_same_weights({k: v.float() for k, v in load_file(output).items()}, reference_weights, atol=1e-6)


def test_report_on_a_real_run_holds_its_final_numbers(reference, tmp_path):
    from launch.cli import main

    out = tmp_path / "report"
    assert main(["report", str(reference), "--output", str(out)]) == 0
    assert {"report.md", "report.html", "loss.png", "lr.png"} <= {p.name for p in out.iterdir()}
    last = rows(reference)[-1]
    md = (out / "report.md").read_text()
    # The final row's numbers at 4 significant digits, as written here rather than by the report's formatter.
    assert f"| train/loss | {last['train/loss']:.4g} |" in md
    assert f"| step | {STEPS} |" in md and "| ZeRO stage | 0 |" in md and "| global batch | 16 |" in md
    page = (out / "report.html").read_text()
    assert f"<td>train/loss</td><td>{last['train/loss']:.4g}</td>" in page


# ------------------------------------------------------------------ weighted mixing through the trainer

SMOKE_CLIP = str(Path(__file__).resolve().parent.parent / "configs" / "smoke_clip.yaml")
# Runs the trainer's plain-process entry in a fresh interpreter (its process group stays there), counting the
# samples of every micro-batch the loop hands to the task's loss: white images come from one source, black
# ones from the other.
COUNTING_RUN = """
import json, sys
from pipeline.config import load_config
from pipeline.tasks.contrastive import ContrastiveTask
from pipeline.trainer import run_worker

counts = {"white": 0, "black": 0}
loss = ContrastiveTask.loss

def counting_loss(self, engine, batch):
    images = batch[0].flatten(1).float().mean(1)  # uint8 (fast decode) or normalised floats
    white = int((images > (0.0 if batch[0].is_floating_point() else 127.5)).sum())
    counts["white"] += white
    counts["black"] += len(images) - white
    return loss(self, engine, batch)

ContrastiveTask.loss = counting_loss
run_worker(load_config(sys.argv[1], sys.argv[3:]).to_dict())
open(sys.argv[2], "w").write(json.dumps(counts))
"""


def write_solid_source(folder: Path, colour: int, count: int) -> None:
    import io

    from PIL import Image
    from webdataset import TarWriter

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (colour,) * 3).save(buffer, format="JPEG")
    folder.mkdir(parents=True)
    with TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(count):
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": f"a square number {i}".encode()})


def test_weighted_mixing_reaches_the_trainer_in_proportion_to_the_weights(tmp_path):
    import os
    import subprocess
    import sys

    # Sizes 120 : 40 against weights 1 : 3, so mixing by size (0.25 white) and by weight (0.75) disagree.
    write_solid_source(tmp_path / "black", 0, 120)
    write_solid_source(tmp_path / "white", 255, 40)
    steps, batch = 6, 16
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "run.name=mixed", "run.log_every_steps=1",
                 f"data.train={tmp_path / 'black'}::{tmp_path / 'white'}", "data.train_weights=[1, 3]",
                 "data.val=", f"data.batch_size_per_rank={batch}", "data.num_workers_per_rank=0",
                 "data.shuffle_buffer=16", f"schedule.max_steps={steps}", "schedule.warmup_epochs=0",
                 "checkpoint.every_steps=0", "deepspeed.zero_stage=0", "ray.num_workers=1",
                 "eval.every_steps=0", "eval.at_end=false", "eval.zeroshot=[]"]
    counts_file = tmp_path / "counts.json"
    result = subprocess.run([sys.executable, "-c", COUNTING_RUN, SMOKE_CLIP, str(counts_file), *overrides],
                            capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(counts_file.read_text())
    assert counts["white"] + counts["black"] == steps * batch
    # 96 draws with p = 0.75: one standard deviation is 0.044; the seed is fixed, so this is not flaky, and
    # 0.1 is far from the 0.25 a mix by size would give.
    assert abs(counts["white"] / (steps * batch) - 0.75) <= 0.1, counts
    assert [r["step"] for r in rows(tmp_path / "runs" / "mixed") if "train/loss" in r] == list(range(1, steps + 1))
