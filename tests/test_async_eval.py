"""Evaluation that follows training (pipeline/evaluation/follow.py, async_eval.py): eval.async in a real run on
the session's Ray cluster, and `launch eval --follow` on the finished run, both checked against `launch eval`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main as launch_main
from launch.prepare import check_async_eval
from launch.pretrain import check_cluster_fits
from pipeline import checkpoint
from pipeline.config import Config, ConfigError
from pipeline.evaluation.follow import FOLLOW_LOG, eval_sets
from pipeline.reporting.run_record import load_run
from test_pretrain import SMOKE, launch, metrics_rows, tiny_run_overrides

COMPARED = ("acc1", "acc5", "mean_per_class_recall", "num_samples")


def eval_rows(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in metrics_rows(run_dir) if "eval/val/acc1" in row}


@pytest.fixture(scope="module")
def async_run(ray_session, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # keep_last 2: the save at step 24 deletes step 8's checkpoint, unless its evaluation is still running.
    overrides = tiny_run_overrides(out, digits_root, f"{digits_root}/labelled/train", **{
        "schedule.max_steps": 24, "checkpoint.every_steps": 8, "checkpoint.keep_last": 2,
        "eval.async": "true", "eval.at_end": "false"})
    final, run_dir = launch(overrides)
    return final, run_dir


def launch_eval(ckpt_dir: Path, data: str, output: Path) -> dict:
    assert launch_main(["eval", "classify", "--checkpoint", str(ckpt_dir), "--data", data,
                        "--output", str(output)]) == 0
    return json.loads(output.read_text())["metrics"]


@pytest.mark.integration
def test_async_eval_logs_each_checkpoint_at_its_step_as_launch_eval_scores_it(async_run, digits_root, tmp_path):
    final, run_dir = async_run
    rows = eval_rows(run_dir)
    assert sorted(rows) == [8, 16, 24]  # every checkpoint, step 8's too, which retention deleted
    assert all(row["eval/val/num_samples"] == 360 for row in rows.values())  # every held-out sample
    assert [p.name for p in checkpoint.list_complete(run_dir)] == ["step_00000016", "step_00000024"]
    expected = launch_eval(run_dir / "checkpoints" / "step_00000024", f"{digits_root}/labelled/val",
                           tmp_path / "step24.json")
    assert {m: rows[24][f"eval/val/{m}"] for m in COMPARED} == pytest.approx({m: expected[m] for m in COMPARED},
                                                                              abs=1e-9)
    assert rows[24]["checkpoint"] == str(run_dir / "checkpoints" / "step_00000024")
    # The last checkpoint's evaluation ends after final_metrics.json is first written: it joins it, and the outcome.
    final_file = json.loads((run_dir / "final_metrics.json").read_text())
    assert final_file["eval/val/acc1"] == rows[24]["eval/val/acc1"] == final["eval/val/acc1"]
    assert "train/loss" in final_file
    # The report reads eval rows, logged after later training rows, into their own step's row; no resume.
    record = load_run(run_dir)
    assert record.num_resumes == 0
    by_step = {row["step"]: row for row in record.rows}
    assert "train/loss" in by_step[24] and by_step[24]["eval/val/acc1"] == rows[24]["eval/val/acc1"]


@pytest.mark.integration
def test_follow_evaluates_each_checkpoint_once_and_resumes(async_run, capsys):
    _, run_dir = async_run
    argv = ["eval", "--follow", str(run_dir), "--until-done", "--interval-s", "0.1"]
    assert launch_main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluated_steps"] == [16, 24]
    followed = [json.loads(line) for line in (run_dir / FOLLOW_LOG).read_text().splitlines()]
    assert [row["step"] for row in followed] == [16, 24]
    async_row = eval_rows(run_dir)[24]
    assert {k: v for k, v in followed[1].items() if k.startswith("eval/")} == pytest.approx(
        {k: v for k, v in async_row.items() if k.startswith("eval/")}, abs=1e-9)
    assert len(list((run_dir / "eval").glob("val__classification__*.json"))) == 2  # `launch report` reads these
    assert launch_main(argv) == 0  # a second follower: everything is in the record already
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluated_steps"] == []
    assert len((run_dir / FOLLOW_LOG).read_text().splitlines()) == 2


def test_no_ray_refuses_async_eval_in_one_line(digits_root, tmp_path, capsys):
    overrides = tiny_run_overrides(tmp_path, digits_root, f"{digits_root}/labelled/train", **{"eval.async": "true"})
    argv = ["pretrain", "--config", SMOKE, "--no-ray", *(x for o in overrides for x in ("--set", o))]
    assert launch_main(argv) == 2
    err = capsys.readouterr().err
    assert "eval.async: the evaluation actor needs Ray" in err and err.count("\n") == 1
    assert not (tmp_path / "tiny").exists()


def test_cluster_must_hold_the_ranks_and_the_actor():
    cfg = Config.from_dict({"data": {"train": "unused"}, "eval": {"async": True, "async_num_cpus": 1},
                            "ray": {"num_workers": 2, "cpus_per_worker": 1}})
    check_cluster_fits(cfg, use_gpu=False, totals={"CPU": 3.0})
    with pytest.raises(ConfigError, match=r"eval.async_num_cpus: .* need 3 CPUs, the Ray cluster has 2"):
        check_cluster_fits(cfg, use_gpu=False, totals={"CPU": 2.0})


def test_retention_keeps_checkpoints_waiting_for_their_evaluation(tmp_path):
    for step in (8, 16, 24):
        path = checkpoint.checkpoints_root(tmp_path) / checkpoint.step_tag(step)
        path.mkdir(parents=True)
        (path / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    waiting = checkpoint.checkpoints_root(tmp_path) / checkpoint.step_tag(16)
    checkpoint.apply_retention(tmp_path, keep_last=1, keep_every=0, protected={waiting})
    assert [p.name for p in checkpoint.list_complete(tmp_path)] == ["step_00000016", "step_00000024"]
    checkpoint.apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert [p.name for p in checkpoint.list_complete(tmp_path)] == ["step_00000024"]


def test_sets_follow_the_family_and_name_their_keys():
    clip = Config.from_dict({"data": {"train": "t", "val": "/d/image_text/val"},
                             "model": {"kind": "clip", "name": "clip-tiny-rn"},
                             "eval": {"zeroshot": ["digits=/d/zeroshot", "/e/cifar10/"]}})
    assert [(s.name, s.task) for s in eval_sets(clip)] == [("val", "retrieval"), ("digits", "zeroshot"),
                                                          ("cifar10", "zeroshot")]
    classifier = Config.from_dict({"data": {"train": "t", "val": "/d/labelled/val"}})
    assert [(s.name, s.task, s.path) for s in eval_sets(classifier)] == [("val", "classify", "/d/labelled/val")]
    with pytest.raises(ConfigError, match=r"data.val: two evaluation sets would write eval/val/"):
        eval_sets(Config.from_dict({"data": {"train": "t", "val": "/a/val::/b/val"}}))
    with pytest.raises(ConfigError, match=r"data.val: checkpoints are evaluated on folders, .* not '/d/\{0"):
        eval_sets(Config.from_dict({"data": {"train": "t", "val": "/d/{0..3}.tar"}}))


def test_a_run_in_a_bucket_is_refused_for_now():
    cfg = Config.from_dict({"data": {"train": "t", "val": "/d/val"}, "run": {"output_dir": "s3://bucket/runs"},
                            "eval": {"async": True}})
    with pytest.raises(ConfigError, match=r"x.yaml: eval.async: needs a local run.output_dir"):
        check_async_eval(cfg, "x.yaml")
