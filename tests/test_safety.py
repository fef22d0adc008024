"""Checkpoints are data, not code: a pickle that would run code, planted in a real checkpoint (in place of
its model-states file, or of one rank's optimizer-states file), is refused by every stage that loads
checkpoints (eval, export, resume, distillation teacher) with one line naming the file, and its payload
never runs. A missing or truncated file is one line too."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.prepare import write_run_record
from launch.pretrain import prepared_config, run_on_ray
from pipeline import checkpoint
from test_evaluation_helpers import write_our_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMOKE_RESNET = str(REPO / "configs" / "smoke_resnet.yaml")
SMOKE_DISTILL = str(REPO / "configs" / "smoke_distill.yaml")
STEP = 4
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def run_overrides(out: Path, digits_root: Path, name: str = "source", **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": name, "data.train": f"{digits_root}/labelled/train",
        "data.val": "", "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 1,
        "data.image_size_px": 16, "data.num_classes": 10, "model.name": "resnet_nano",
        "schedule.warmup_epochs": 0, "schedule.max_steps": STEP, "checkpoint.every_steps": STEP,
        "deepspeed.zero_stage": 2, "ray.num_workers": 2, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def real_run(ray_session, digits_root, tmp_path_factory):
    """A real 2-rank ZeRO-2 run with one checkpoint (model states + one optimizer shard per rank)."""
    out = tmp_path_factory.mktemp("safety")
    cfg = prepared_config(SMOKE_RESNET, run_overrides(out, digits_root))
    write_run_record(cfg, SMOKE_RESNET)
    assert run_on_ray(cfg, address=None)["step"] == STEP
    ckpt = cfg.run_dir / "checkpoints" / checkpoint.step_tag(STEP)
    assert {MODEL_STATES, OPTIM_STATES} <= {p.name for p in ckpt.iterdir()}
    return cfg.run_dir


def planted(real_run: Path, tmp_path: Path, victim: str, file_format: str) -> tuple[Path, Path, Path]:
    """A copy of the run whose `victim` file carries a payload beside its real content, so that a loader that
    unpickles it whole goes on to work as if nothing happened: (run dir, the planted file, the payload's marker)."""
    run_dir = tmp_path / "runs" / real_run.name
    shutil.copytree(real_run, run_dir)
    target = run_dir / "checkpoints" / checkpoint.step_tag(STEP) / victim
    marker = tmp_path / "payload_ran"
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own fixture's file: trusted
    state["extra"] = Payload(f"touch {marker}")
    # "zip": torch.save's format, as DeepSpeed writes; "legacy": the older bare-pickle format.
    torch.save(state, target, _use_new_zipfile_serialization=file_format == "zip")
    return run_dir, target, marker


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


VICTIMS = [(MODEL_STATES, "zip"), (OPTIM_STATES, "legacy")]


@pytest.mark.parametrize("victim, how", VICTIMS)
def test_eval_refuses_a_planted_pickle(real_run, digits_root, tmp_path, capsys, victim, how):
    run_dir, target, marker = planted(real_run, tmp_path, victim, how)
    code = main(["eval", "classify", "--checkpoint", str(run_dir), "--data", f"{digits_root}/labelled",
                 "--split", "val"])
    assert not marker.exists()  # the payload did not run
    line = one_error_line(capsys)
    assert code == 2 and str(target) in line and "refused" in line
    assert "system" in line and "weights_only=False" not in line  # names what it would have called, and no way around


@pytest.mark.parametrize("victim, how", VICTIMS)
def test_export_refuses_a_planted_pickle(real_run, tmp_path, capsys, victim, how):
    run_dir, target, marker = planted(real_run, tmp_path, victim, how)
    output = tmp_path / "out.safetensors"
    code = main(["export", "--checkpoint", str(run_dir), "--format", "safetensors", "--output", str(output)])
    assert not marker.exists() and not output.exists()
    line = one_error_line(capsys)
    assert code == 2 and str(target) in line and "refused" in line


@pytest.mark.parametrize("victim, how", VICTIMS)
def test_distill_refuses_a_planted_teacher(real_run, digits_root, tmp_path, capsys, victim, how):
    run_dir, target, marker = planted(real_run, tmp_path, victim, how)
    code = main(["distill", "--config", SMOKE_DISTILL, *sets(run_overrides(
        tmp_path / "student", digits_root, "student", **{"distill.teacher": str(run_dir)}))])
    assert not marker.exists()
    line = one_error_line(capsys)
    assert code == 2 and "distill.teacher" in line and str(target) in line and "refused" in line


@pytest.mark.parametrize("victim, how", VICTIMS)
def test_relaunch_refuses_to_resume_from_a_planted_pickle(real_run, digits_root, tmp_path, capsys, victim, how):
    run_dir, target, marker = planted(real_run, tmp_path, victim, how)
    code = main(["pretrain", "--config", SMOKE_RESNET, *sets(run_overrides(
        run_dir.parent, digits_root, run_dir.name, **{"schedule.max_steps": 2 * STEP}))])
    assert not marker.exists()
    line = one_error_line(capsys)
    assert code == 2 and str(target) in line and "refused" in line


def test_workers_refuse_a_planted_pickle_on_their_own(real_run, digits_root, tmp_path, capsys):
    """The launcher's check aside: the workers' own resume (DeepSpeed's engine.load_checkpoint) refuses too."""
    run_dir, target, marker = planted(real_run, tmp_path, OPTIM_STATES, "legacy")
    cfg = prepared_config(SMOKE_RESNET, run_overrides(run_dir.parent, digits_root, run_dir.name,
                                                      **{"schedule.max_steps": 2 * STEP, "checkpoint.resume": False}))
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
    assert run_on_ray(cfg, address=None) is None  # the run stops: nothing to resume from that it may load
    assert not marker.exists()
    failure = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(failure) == 1 and str(target) in failure[0] and "refused" in failure[0], failure


def test_forced_weights_only_covers_deepspeeds_own_torch_load(tmp_path):
    """A file swapped after the check still cannot run code: inside the guard every torch.load is weights-only,
    even one that asks for weights_only=False (as DeepSpeed's loaders do)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "swapped.pt"
    torch.save({"extra": Payload(f"touch {marker}")}, path)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(ValueError, match="refused") as err:
        with checkpoint._deepspeed_loads_weights_only(tmp_path):
            torch.load(path, weights_only=False)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # restored


def test_zero_stage_0_checkpoint_with_a_planted_pickle_is_refused(tmp_path):
    from pipeline.evaluation.resolver import resolve

    ckpt = write_our_checkpoint(tmp_path / "run", 10, {"w": torch.zeros(1)}, {})
    marker = tmp_path / "payload_ran"
    torch.save({"module": {"w": torch.zeros(1)}, "extra": Payload(f"touch {marker}")}, ckpt / MODEL_STATES)
    with pytest.raises(ValueError, match=f"{MODEL_STATES}: refused"):
        resolve(str(ckpt))
    assert not marker.exists()


# ------------------------------------------------------------------ missing and truncated files


def damaged(real_run: Path, tmp_path: Path, victim: str, how: str) -> tuple[Path, Path]:
    run_dir = tmp_path / "runs" / real_run.name
    shutil.copytree(real_run, run_dir)
    target = run_dir / "checkpoints" / checkpoint.step_tag(STEP) / victim
    if how == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return run_dir, target


@pytest.mark.parametrize("victim, how, message", [
    (MODEL_STATES, "missing", "missing from the checkpoint"),
    (MODEL_STATES, "truncated", "truncated"),
    (OPTIM_STATES, "truncated", "truncated"),
])
def test_missing_or_truncated_files_are_one_line(real_run, digits_root, tmp_path, capsys, victim, how, message):
    run_dir, target = damaged(real_run, tmp_path, victim, how)
    code = main(["eval", "classify", "--checkpoint", str(run_dir), "--data", f"{digits_root}/labelled",
                 "--split", "val"])
    line = one_error_line(capsys)
    assert code == 2 and str(target) in line and message in line, line
    code = main(["pretrain", "--config", SMOKE_RESNET, *sets(run_overrides(
        run_dir.parent, digits_root, run_dir.name, **{"schedule.max_steps": 2 * STEP}))])
    line = one_error_line(capsys)
    assert code == 2 and str(target) in line and message in line, line
