"""launch distill: function matching from a real teacher run, on real Ray + DeepSpeed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main
from launch.prepare import write_run_record
from launch.pretrain import prepared_config, run_on_ray
from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.tasks.distill import DistillClassifierTask, kl_teacher_student

REPO = Path(__file__).resolve().parent.parent
SMOKE_RESNET = str(REPO / "configs" / "smoke_resnet.yaml")
SMOKE_DISTILL = str(REPO / "configs" / "smoke_distill.yaml")


def small(out: Path, name: str, digits_root: Path, **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": name, "run.log_every_steps": 10,
        "data.train": f"{digits_root}/labelled/train", "data.val": f"{digits_root}/labelled/val",
        "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 1, "data.image_size_px": 16,
        "model.name": "resnet_nano", "schedule.warmup_epochs": 0, "schedule.max_steps": 60,
        "checkpoint.every_steps": 0, "ray.num_workers": 2, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def launch(config: str, args: list[str]) -> tuple[dict, Path]:
    cfg = prepared_config(config, args)
    write_run_record(cfg, config)
    final = run_on_ray(cfg, address=None)
    assert final, "training failed"
    return final, cfg.run_dir


@pytest.fixture(scope="module")
def teacher_run(ray_session, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    final, run_dir = launch(SMOKE_RESNET, small(out, "teacher", digits_root, **{"optim.lr": 0.2}))
    return out, final, run_dir


def test_function_matching_student_learns_from_teacher_only(teacher_run, digits_root):
    out, teacher_final, teacher_dir = teacher_run
    final, run_dir = launch(SMOKE_DISTILL, small(out, "student", digits_root, **{
        "distill.teacher": str(teacher_dir), "run.seed": 7, "optim.lr": 0.01, "data.mixup_alpha": 0.2}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] * 0.7, losses
    # no labels were used (hard_label_weight 0), yet the student tracks the teacher well above chance
    assert final["val/top1"] > 0.25, (final, teacher_final)
    # the teacher is never written into the student's checkpoint, but the run records it
    state, meta = checkpoint.load_consolidated(checkpoint.find_latest_complete(run_dir))
    teacher_state, _ = checkpoint.load_consolidated(checkpoint.find_latest_complete(teacher_dir))
    assert set(state) == set(teacher_state)  # same architecture, and nothing extra
    assert meta["config"]["distill"]["teacher"] == str(teacher_dir)


def test_distillation_run_resumes_from_its_checkpoint(teacher_run, digits_root):
    out, _, teacher_dir = teacher_run
    args = {"distill.teacher": str(teacher_dir), "optim.lr": 0.01, "checkpoint.every_steps": 20}
    final, run_dir = launch(SMOKE_DISTILL, small(out, "student_resume", digits_root, **args,
                                                  **{"schedule.max_steps": 20}))
    assert final["step"] == 20
    final, _ = launch(SMOKE_DISTILL, small(out, "student_resume", digits_root, **args,
                                            **{"schedule.max_steps": 30}))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30] and final["step"] == 30  # the relaunch went on from step 20


def test_teacher_and_student_see_the_identical_view(teacher_run, digits_root, tmp_path):
    out, _, teacher_dir = teacher_run
    cfg = load_config(SMOKE_DISTILL, small(out, "unit", digits_root, **{
        "distill.teacher": str(teacher_dir), "data.mixup_alpha": 0.4}))
    np.random.seed(0)  # timm's Mixup draws lam from numpy; beta(0.4, 0.4) is never exactly 1
    task = DistillClassifierTask(cfg, torch.device("cpu"))
    seen = {}
    teacher_forward = task.teacher.model.forward

    def spy_teacher(images):
        seen["teacher"] = images.clone()
        return teacher_forward(images)

    class SpyStudent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = task.build_model()

        def forward(self, images):
            seen["student"] = images.clone()
            return self.model(images)

    task.teacher.model.forward = spy_teacher
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    loss, n = task.loss(SpyStudent(), (images.clone(), labels))  # (timm's mixup works in place)
    assert n == 8 and torch.isfinite(loss)
    # teacher input = student input, up to the (identity here) re-normalisation to the teacher's stats
    assert torch.allclose(seen["teacher"], seen["student"])
    assert not torch.allclose(seen["student"], images)  # and that view was mixed, once


def test_kl_equals_a_hand_computation():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    t = 2.0
    expected = 0.0
    for row_t, row_s in zip(teacher.tolist(), student.tolist()):
        p = [math.exp(v / t) for v in row_t]
        q = [math.exp(v / t) for v in row_s]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t * t  # batch mean, times T^2
    assert kl_teacher_student(teacher, student, t).item() == pytest.approx(expected, rel=1e-6)
    assert kl_teacher_student(teacher, teacher, t).abs() < 1e-7


def test_teacher_parameters_do_not_change_while_the_student_trains(teacher_run, digits_root):
    from pipeline.data.stream import Position

    out, _, teacher_dir = teacher_run
    cfg = load_config(SMOKE_DISTILL, small(out, "frozen", digits_root, **{"distill.teacher": str(teacher_dir),
                                                                         "data.num_workers_per_rank": 0}))
    task = DistillClassifierTask(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student = task.build_model().train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    batches = task.train_batches(0, 1, Position())
    for _ in range(3):
        loss, _ = task.loss(student, next(batches).batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics alike
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_clip_teacher_logits_equal_the_evaluation_stage_zero_shot_logits(tmp_path, digits_root):
    import open_clip

    from pipeline.evaluation.zero_shot import LOGIT_SCALE, build_zeroshot_head
    from pipeline.models.clip import register_tiny_configs
    from pipeline.tasks.distill import TeacherLogits, load_teacher, zero_shot_prompts

    register_tiny_configs()
    torch.manual_seed(1)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("clip-tiny-rn").state_dict(), weights)
    cfg = load_config(SMOKE_DISTILL, [f"data.train={digits_root}/labelled/train", f"distill.teacher={weights}",
                                      "distill.teacher_model=clip-tiny-rn",
                                      f"distill.zeroshot_classes={digits_root}/zeroshot"])
    resolved = load_teacher(cfg)
    teacher = TeacherLogits(resolved, cfg, torch.device("cpu"))
    images = torch.randn(4, 3, 32, 32)  # normalised with the student's statistics (data.mean/std)
    classnames, templates = zero_shot_prompts(cfg)
    # The evaluation stage's zero-shot logits on the same pixels, normalised with the teacher's own stats.
    classifier = build_zeroshot_head(resolved.model, resolved.tokenizer, classnames, templates, torch.device("cpu"))
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    norm = next(t for t in resolved.preprocess.transforms if type(t).__name__ == "Normalize")
    pixels = images * std + mean
    theirs = (pixels - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        features = torch.nn.functional.normalize(resolved.model.encode_image(theirs), dim=-1)
    expected = LOGIT_SCALE * features @ classifier
    assert torch.allclose(teacher(images), expected, atol=1e-4)
    assert expected.shape == (4, 10)


def test_missing_teacher_run_names_the_command_that_makes_it(tmp_path, digits_root, capsys):
    code = main(["distill", "--config", SMOKE_DISTILL, "--set", f"distill.teacher={tmp_path}/smoke_resnet",
                 "--set", f"data.train={digits_root}/labelled/train", "--set", f"data.val={digits_root}/labelled/val"])
    err = capsys.readouterr().err
    assert code == 2 and "distill.teacher" in err and SMOKE_DISTILL in err
    # The config beside the given one that names the missing run.
    assert f"launch pretrain --config {Path(SMOKE_DISTILL).parent / 'smoke_resnet.yaml'}` produces it" in err, err


def test_teacher_with_other_class_count_is_refused(teacher_run, digits_root, capsys):
    out, _, teacher_dir = teacher_run
    code = main(["distill", "--config", SMOKE_DISTILL, *sum((["--set", a] for a in small(
        out, "bad", digits_root, **{"distill.teacher": str(teacher_dir), "data.num_classes": 12})), [])])
    err = capsys.readouterr().err
    assert code == 2 and "teacher predicts 10 classes, the student 12" in err, err


def clip_distill_config(tmp_path, digits_root, teacher: str, **extra):
    from pipeline.models.clip import register_tiny_configs

    register_tiny_configs()
    args = {"run.output_dir": str(tmp_path), "data.train": f"{digits_root}/image_text/train",
            "data.val": "", "data.batch_size_per_rank": 8, "data.num_workers_per_rank": 0,
            "distill.teacher": teacher, "distill.teacher_model": "clip-tiny-rn",
            "distill.hard_label_weight": 1.0, "eval.zeroshot": "[]", **extra}
    return load_config(REPO / "configs" / "smoke_clip.yaml", [f"{k}={v}" for k, v in args.items()])


def test_clip_student_matches_clip_teacher_similarities(tmp_path, digits_root):
    import open_clip

    from pipeline.data.stream import Position
    from pipeline.models.clip import register_tiny_configs
    from pipeline.tasks.distill import DistillContrastiveTask

    register_tiny_configs()
    torch.manual_seed(0)
    teacher = open_clip.create_model("clip-tiny-rn")
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    cfg = clip_distill_config(tmp_path, digits_root, str(weights))
    DistillContrastiveTask.check(cfg)
    task = DistillContrastiveTask(cfg, torch.device("cpu"))
    batch = next(task.train_batches(0, 1, Position())).batch
    copy = task.build_model()
    own = copy.state_dict()  # (our CLIP keeps logit_scale 1-element for DeepSpeed; open_clip's is 0-d)
    copy.load_state_dict({k: v.reshape(own[k].shape) for k, v in teacher.state_dict().items()})
    strangers = task.build_model()
    # BatchNorm as the frozen teacher runs it: in train mode the copy's batch statistics (8 samples) would
    # move its features away from the teacher's, and whether it still wins would depend on the batch drawn.
    copy.eval(), strangers.eval()
    with torch.no_grad():
        same, _ = task.loss(copy, batch)
        other, _ = task.loss(strangers, batch)
    assert torch.isfinite(same) and same < other  # the teacher's own similarities fit its targets best
    loss, n = task.loss(strangers, batch)
    loss.backward()
    assert n == 8 and all(p.grad is None for p in task.teacher.parameters())  # the teacher stays frozen


def test_clip_student_refuses_a_classifier_teacher(teacher_run, tmp_path, digits_root):
    from pipeline.config import ConfigError
    from pipeline.tasks.distill import DistillContrastiveTask

    _, _, teacher_dir = teacher_run
    cfg = clip_distill_config(tmp_path, digits_root, str(teacher_dir), **{"distill.teacher_model": "null"})
    with pytest.raises(ConfigError, match="needs a CLIP teacher"):
        DistillContrastiveTask.check(cfg)
