"""Nothing silently mismatches (issue 12): class lists, configs and sample counts.

Class lists: a labelled set whose class names differ from the model's (another order, a subset) is mapped
by name with one line saying so, and names the model does not know are a one-line error, in `launch eval
classify`, in the training preflight (data.val against data.train) and in training validation. Configs: a
relaunch resumes only when the checkpoint's config differs in resumable keys alone, keeping the earlier
config. Sample counts: fewer samples than the manifest lists is a warning in the console and the JSON
(an error with `launch eval --strict`), in evaluation and in training validation.

Most tests are driver-level (no Ray): a resnet_nano trained for a few seconds in this process is written as
one of our checkpoints; one `launch pretrain --no-ray` run checks what training records.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from launch.cli import main as launch_main
from launch.prepare import write_run_record
from launch.pretrain import prepared_config
from pipeline.config import ConfigError, load_config
from shard_helpers import shard_samples
from test_evaluation_helpers import write_our_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")
SMOKE_DISTILL = str(REPO / "configs" / "smoke_distill.yaml")
CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
REORDERED = CLASSNAMES[5:] + CLASSNAMES[:5]


def overrides(out: Path, digits_root: Path, name: str = "tiny", **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": name, "run.log_every_steps": 8,
        "data.train": f"{digits_root}/labelled/train", "data.val": f"{digits_root}/labelled/val",
        "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 0, "data.image_size_px": 16,
        "model.name": "resnet_nano", "optim.lr": 0.2, "schedule.warmup_epochs": 0,
        "schedule.max_steps": 48, "checkpoint.every_steps": 24, "deepspeed.zero_stage": 0,
        "ray.num_workers": 1, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is many times faster than two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ data sets with other class lists


def _samples(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for raw in shard_samples(folder / shard["name"]):
            yield shard["name"], {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}


def _write_set(dst: Path, template: dict, shards: dict[str, list[dict]], names: list[str]) -> Path:
    dst.mkdir(parents=True)
    for name, samples in shards.items():
        with wds.TarWriter(str(dst / name)) as sink:
            for sample in samples:
                sink.write(sample)
    entries = [{"name": name, "num_samples": len(samples)} for name, samples in shards.items()]
    manifest = {**template, "classnames": names, "num_classes": len(names), "shards": entries,
                "num_samples": sum(e["num_samples"] for e in entries)}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def relabelled_copy(src: Path, dst: Path, names: list[str]) -> Path:
    """src's samples whose class is in `names`, labelled as indices into `names`; its manifest lists `names`."""
    template = json.loads((src / "manifest.json").read_text())
    shards: dict[str, list[dict]] = {}
    for shard, sample in _samples(src):
        name = CLASSNAMES[int(sample["cls"])]
        if name in names:
            shards.setdefault(shard, []).append({**sample, "cls": str(names.index(name)).encode()})
    return _write_set(dst, template, shards, names)


def truncated_copy(src: Path, dst: Path, keep_in_last_shard: int) -> Path:
    """src unchanged but for its last shard, which keeps only its first samples: the manifest still lists all."""
    shutil.copytree(src, dst)
    last = json.loads((dst / "manifest.json").read_text())["shards"][-1]["name"]
    kept = [sample for shard, sample in _samples(src) if shard == last][:keep_in_last_shard]
    with wds.TarWriter(str(dst / last)) as sink:
        for sample in kept:
            sink.write(sample)
    return dst


# ------------------------------------------------------------------ a classifier that knows the digits


def _train_in_process(cfg, digits_root: Path) -> dict[str, torch.Tensor]:
    """resnet_nano fitted to the digits' training set for a few seconds (eval transform, no augmentation)."""
    from pipeline.data.labelled import eval_transform
    from pipeline.data.reader import decode_image
    from pipeline import families

    torch.manual_seed(0)
    transform = eval_transform(cfg.data)
    pairs = [(transform(decode_image(s)), int(s["cls"])) for _, s in _samples(digits_root / "labelled" / "train")]
    images, labels = torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    model = families.get(cfg.model.kind).build(cfg, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(6):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().state_dict()


@pytest.fixture(scope="module")
def classifier(digits_root, tmp_path_factory):
    """(run dir of one of our checkpoints, its config): meta.json records the class names, as training does."""
    out = tmp_path_factory.mktemp("classifier")
    cfg = load_config(SMOKE, overrides(out, digits_root, "trained", **{"data.num_classes": 10}))
    state = _train_in_process(cfg, digits_root)
    ckpt = write_our_checkpoint(cfg.run_dir, 10, state, cfg.to_dict())
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "class_names": CLASSNAMES}))
    return cfg.run_dir, state


@pytest.fixture(scope="module")
def sets(digits_root, tmp_path_factory):
    root, val = tmp_path_factory.mktemp("sets"), digits_root / "labelled" / "val"
    return {
        "val": val,
        "reordered": relabelled_copy(val, root / "reordered", REORDERED),
        "subset": relabelled_copy(val, root / "subset", ["seven", "three", "one"]),
        "unknown": relabelled_copy(val, root / "unknown", [*CLASSNAMES[:9], "ten"]),
        "truncated": truncated_copy(val, root / "truncated", keep_in_last_shard=12),
    }


def eval_classify(checkpoint: Path, data: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    code = launch_main(["eval", "classify", "--checkpoint", str(checkpoint), "--data", str(data),
                        "--workers", "0", "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


# ------------------------------------------------------------------ class lists in `launch eval classify`


def test_eval_maps_a_reordered_class_list_by_name(classifier, sets, capsys):
    run_dir, _ = classifier
    _, original, _ = eval_classify(run_dir, sets["val"], capsys)
    assert original["metrics"]["acc1"] > 0.6  # the model knows the digits: a wrong mapping would show
    code, reordered, err = eval_classify(run_dir, sets["reordered"], capsys)
    assert code == 0
    # the same images scored against the same classes: the same numbers, not the 10%-ish of a silent misfit
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_samples"):
        assert reordered["metrics"][key] == pytest.approx(original["metrics"][key]), key
    assert "same 10 classes" in reordered["metrics"]["label_mapping"]
    assert original["metrics"]["label_mapping"].startswith("identity")
    mapped_lines = [line for line in err.splitlines() if line.startswith("[eval]")]
    assert len(mapped_lines) == 1 and "in another order" in mapped_lines[0] and "by name" in mapped_lines[0]


def test_eval_maps_a_subset_of_the_model_classes_by_name(classifier, sets, capsys):
    run_dir, _ = classifier
    code, subset, err = eval_classify(run_dir, sets["subset"], capsys)
    assert code == 0
    # labels 0, 1, 2 of this set are the model's seven, three, one; scored as 0, 1, 2 they would be ~0%
    assert subset["metrics"]["acc1"] > 0.6
    assert "3 of the 10 classes" in subset["metrics"]["label_mapping"]
    assert "3 of the 10 classes" in err


def test_eval_refuses_class_names_the_model_does_not_know(classifier, sets, capsys):
    run_dir, _ = classifier
    code, _, err = eval_classify(run_dir, sets["unknown"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'ten'" in lines[0], err
    assert "not among the 10 classes of the model" in lines[0]


def test_eval_of_a_checkpoint_without_recorded_names_uses_its_training_manifest(classifier, sets, capsys,
                                                                                  tmp_path):
    run_dir, state = classifier
    # a checkpoint written before meta.json recorded class names: its config still names the training set
    config = json.loads(next((run_dir / "checkpoints").iterdir()).joinpath("meta.json").read_text())["config"]
    older = write_our_checkpoint(tmp_path / "older", 10, state, config)
    code, result, _ = eval_classify(older, sets["reordered"], capsys)
    assert code == 0 and "same 10 classes" in result["metrics"]["label_mapping"]
    assert "labelled/train" in result["metrics"]["label_mapping"]


# ------------------------------------------------------------------ sample counts in `launch eval`


def test_eval_warns_when_the_shards_hold_fewer_samples_than_the_manifest(classifier, sets, capsys):
    run_dir, _ = classifier
    code, result, err = eval_classify(run_dir, sets["truncated"], capsys)
    assert code == 0
    scored = result["metrics"]["num_samples"]
    assert scored == 200 + 12  # shard 0 whole, 12 of shard 1's 160
    assert len(result["warnings"]) == 1 and f"scored {scored} of the 360 samples" in result["warnings"][0]
    assert f"warning: eval classify scored {scored} of the 360" in err
    _, whole, _ = eval_classify(run_dir, sets["val"], capsys)
    assert whole["warnings"] == [] and whole["metrics"]["num_samples"] == 360


def test_eval_strict_makes_a_shortfall_an_error(classifier, sets, capsys):
    run_dir, _ = classifier
    code, _, err = eval_classify(run_dir, sets["truncated"], capsys, "--strict")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: eval classify scored 212 of the 360") and "--strict" in lines[-1]
    assert not any("Traceback" in line for line in lines)


# ------------------------------------------------------------------ class lists in training


def test_preflight_refuses_a_validation_set_with_classes_training_does_not_know(digits_root, sets, tmp_path):
    with pytest.raises(ConfigError) as err:
        prepared_config(SMOKE, overrides(tmp_path, digits_root, **{"data.val": str(sets["unknown"])}))
    assert err.value.key == "data.val" and "'ten'" in str(err.value) and "\n" not in str(err.value)


def test_preflight_refuses_fewer_num_classes_than_the_manifest_lists(digits_root, tmp_path):
    with pytest.raises(ConfigError) as err:
        prepared_config(SMOKE, overrides(tmp_path, digits_root, **{"data.num_classes": 5, "data.val": ""}))
    assert err.value.key == "data.num_classes" and "lists 10 classes" in str(err.value)


def test_validation_maps_a_reordered_validation_set_by_name(classifier, digits_root, sets, tmp_path, capsys):
    from pipeline.tasks.classify import ClassifyTask

    _, state = classifier

    def validate(val: Path) -> dict:
        cfg = prepared_config(SMOKE, overrides(tmp_path, digits_root, **{"data.val": str(val)}))
        task = ClassifyTask(cfg, torch.device("cpu"))
        model = task.build_model()
        model.load_state_dict(state)
        return task.evaluate(model.eval(), rank=0, world_size=1)

    original = validate(sets["val"])
    capsys.readouterr()
    reordered = validate(sets["reordered"])
    launched = capsys.readouterr().out
    assert original["top1"] > 0.6
    assert reordered["top1"] == pytest.approx(original["top1"]) and reordered["loss"] == pytest.approx(original["loss"])
    assert "[launch] data.val: the validation set lists the same 10 classes" in launched


def test_validation_reports_a_shortfall_against_the_manifest(classifier, digits_root, sets, tmp_path, capsys):
    from pipeline.tasks.classify import ClassifyTask

    _, state = classifier
    cfg = prepared_config(SMOKE, overrides(tmp_path, digits_root, **{"data.val": str(sets["truncated"])}))
    task = ClassifyTask(cfg, torch.device("cpu"))
    model = task.build_model()
    model.load_state_dict(state)
    result = task.evaluate(model.eval(), rank=0, world_size=1)
    assert result["samples"] == 212 and result["expected_samples"] == 360
    assert len(result["warnings"]) == 1 and "validation scored 212 of the 360 samples" in result["warnings"][0]
    assert "148 skipped (sample missing from shard" in result["warnings"][0]
    assert "[pretrain] warning: validation scored 212 of the 360" in capsys.readouterr().out


def test_distillation_refuses_a_teacher_with_another_class_list(classifier, digits_root, tmp_path):
    run_dir, state = classifier
    config = json.loads(next((run_dir / "checkpoints").iterdir()).joinpath("meta.json").read_text())["config"]
    teacher = write_our_checkpoint(tmp_path / "teacher", 10, state, config)
    meta = json.loads((teacher / "meta.json").read_text())
    (teacher / "meta.json").write_text(json.dumps({**meta, "class_names": REORDERED}))
    with pytest.raises(ConfigError) as err:
        prepared_config(SMOKE_DISTILL, overrides(tmp_path, digits_root, "student", **{"distill.teacher": str(teacher)}))
    assert err.value.key == "distill.teacher" and "another order" in str(err.value)


# ------------------------------------------------------------------ configs on relaunch


@pytest.fixture
def checkpointed(digits_root, tmp_path):
    """A run dir as a first launch leaves it: config.yaml and a complete checkpoint at step 24."""
    cfg = prepared_config(SMOKE, overrides(tmp_path, digits_root))
    write_run_record(cfg, SMOKE)
    from pipeline import families

    state = families.get(cfg.model.kind).build(cfg, 10).state_dict()
    ckpt = write_our_checkpoint(cfg.run_dir, 24, state, cfg.to_dict())
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "class_names": CLASSNAMES}))
    return tmp_path, cfg.run_dir, ckpt


def test_relaunch_with_a_changed_config_is_refused_naming_the_keys(checkpointed, digits_root):
    out, run_dir, _ = checkpointed
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        prepared_config(SMOKE, overrides(out, digits_root, **{"optim.lr": 0.1, "data.batch_size_per_rank": 8,
                                                              "schedule.max_steps": 64}))
    message = str(err.value)
    assert err.value.key == "run.name" and "\n" not in message
    assert "data.batch_size_per_rank 16 -> 8" in message and "optim.lr 0.2 -> 0.1" in message
    assert "schedule.max_steps" not in message.split("written with another config:")[1].split(";")[0]
    assert "checkpoint.resume: false" in message and "step_00000024" in message
    assert (run_dir / "config.yaml").read_text() == before
    # checkpoint.resume: false starts the run over (README), whatever its checkpoints were written with
    cfg = prepared_config(SMOKE, overrides(out, digits_root, **{"optim.lr": 0.1, "checkpoint.resume": False}))
    assert cfg.optim.lr == 0.1


def test_relaunch_with_resumable_changes_keeps_the_earlier_config(checkpointed, digits_root, capsys):
    out, run_dir, _ = checkpointed
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    cfg = prepared_config(SMOKE, overrides(out, digits_root, **{"schedule.max_steps": 64, "run.log_every_steps": 4}))
    lines = [line for line in capsys.readouterr().out.splitlines() if "changed settings" in line]
    assert len(lines) == 1
    assert "run.log_every_steps 8 -> 4, schedule.max_steps 48 -> 64" in lines[0] and "step_00000024" in lines[0]
    write_run_record(cfg, SMOKE)
    archived = run_dir / "config.step_00000024.yaml"
    assert archived.read_text() == before and "max_steps: 48" in before
    assert "max_steps: 64" in (run_dir / "config.yaml").read_text()
    # relaunching the same changed config again keeps the first archive: the config the checkpoint was written with
    write_run_record(prepared_config(SMOKE, overrides(out, digits_root, **{"schedule.max_steps": 64,
                                                                           "run.log_every_steps": 4})), SMOKE)
    assert archived.read_text() == before


def test_relaunch_may_change_where_metrics_go_and_how_checkpoints_are_evaluated(checkpointed, digits_root, capsys):
    """Trackers and the asynchronous evaluation's resources change what is logged, not what a step computes."""
    out, _, _ = checkpointed
    capsys.readouterr()
    cfg = prepared_config(SMOKE, overrides(out, digits_root, **{"run.trackers": [], "eval.async_num_cpus": 2.0}))
    assert cfg.run.trackers == () or cfg.run.trackers == []
    line = next(line for line in capsys.readouterr().out.splitlines() if "changed settings" in line)
    assert "eval.async_num_cpus 1.0 -> 2.0" in line and "run.trackers" in line


def test_relaunch_on_a_training_set_with_another_class_list_is_refused(checkpointed, digits_root):
    out, _, ckpt = checkpointed
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "class_names": REORDERED}))
    with pytest.raises(ConfigError) as err:
        prepared_config(SMOKE, overrides(out, digits_root))
    assert err.value.key == "data.train" and "output 0: 'zero' now, 'five' then" in str(err.value)


# ------------------------------------------------------------------ what a real training run records


@pytest.fixture(scope="module")
def no_ray_run(digits_root, tmp_path_factory):
    """`launch pretrain --no-ray` validating on a reordered, truncated copy of the held-out digits."""
    out = tmp_path_factory.mktemp("no_ray")
    val = truncated_copy(relabelled_copy(digits_root / "labelled" / "val", out / "val_reordered", REORDERED),
                         out / "val", keep_in_last_shard=12)
    cmd = [sys.executable, "-m", "launch", "pretrain", "--no-ray", "--config", SMOKE]
    for override in overrides(out, digits_root, "recorded", **{"data.val": str(val), "schedule.max_steps": 4,
                                                               "checkpoint.every_steps": 2}):
        cmd += ["--set", override]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "recorded", result.stdout


@pytest.mark.integration  # a `launch pretrain --no-ray` subprocess (no_ray_run)
def test_training_records_its_class_names_in_every_checkpoint(no_ray_run):
    run_dir, _ = no_ray_run
    metas = [json.loads((p / "meta.json").read_text()) for p in sorted((run_dir / "checkpoints").iterdir())]
    assert [m["step"] for m in metas] == [2, 4]
    assert all(m["class_names"] == CLASSNAMES for m in metas)


@pytest.mark.integration  # a `launch pretrain --no-ray` subprocess (no_ray_run)
def test_training_validation_says_what_it_mapped_and_what_it_missed(no_ray_run):
    run_dir, stdout = no_ray_run
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["val/samples"] == 200 + 12 and final["val/expected_samples"] == 360
    assert "validation scored 212 of the 360 samples" in final["val/warnings"][0]
    assert "[launch] data.val: the validation set lists the same 10 classes" in stdout
    assert "warning: validation scored 212 of the 360" in stdout
    assert "val/samples 212 of 360" in stdout  # the summary line: the metric with its count


# ------------------------------------------------------------------ the report


def test_report_lists_warnings_and_earlier_configs(tmp_path):
    from pipeline.reporting import write_report

    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    short = "validation scored 212 of the 360 samples data.val (x) lists: 148 not read"
    rows = [{"step": 8, "train/loss": 2.0}, {"step": 16, "train/loss": 1.5, "val/top1": 0.8, "val/samples": 212,
                                             "val/expected_samples": 360, "val/warnings": [short]}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text("run: {name: run}\nschedule: {max_steps: 64}\n")
    (run_dir / "config.step_00000008.yaml").write_text("run: {name: run}\nschedule: {max_steps: 16}\n")
    result = {"dataset": "val", "model": "resnet_nano", "task": "classification", "checkpoint_step": 16,
              "metrics": {"acc1": 0.8, "num_samples": 212}, "warnings": ["eval classify scored 212 of the 360"]}
    (run_dir / "eval" / "classify.json").write_text(json.dumps(result))
    markdown = write_report(run_dir).markdown.read_text()
    section = markdown.split("## Warnings", 1)[1].split("\n## ", 1)[0]
    assert f"| step 16 | {short} |" in section
    assert "| eval/classify.json | eval classify scored 212 of the 360 |" in section
    assert "earlier configs: config.step_00000008.yaml" in markdown
