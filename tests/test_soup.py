"""`launch soup`: three real fine-tunes of one pretrained smoke ResNet (different seeds and learning rates),
souped greedily and uniformly on the digits held-out set; the soup is a checkpoint every stage takes, and an
incompatible ingredient is refused in one line.

Every run is `launch pretrain --no-ray` in a subprocess (tests/test_compile.py pretrain_no_ray): resnet_nano
with BatchNorm on 32 px digits, ZeRO-0, a few dozen steps (about 13 s each on a quiet 2-core machine, most of it
interpreter start)."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from launch.cli import main
from pipeline import families
from pipeline.config import Config
from pipeline.evaluation.export import export
from pipeline.evaluation.resolver import resolve
from pipeline.evaluation.tasks import EvalOptions, evaluate
from test_compile import pretrain_no_ray
from test_evaluation_helpers import write_our_checkpoint

pytestmark = pytest.mark.integration  # training subprocesses

SMALL = ("data.image_size_px=32", "data.num_workers_per_rank=0", "deepspeed.zero_stage=0")
# (seed, lr): fine-tunes that differ as the paper's ingredients do, in seed and learning rate.
FINE_TUNES = ((1, 0.02), (2, 0.05), (3, 0.1))


def _train(out: Path, digits_root: Path, name: str, steps: int, *extra: str) -> Path:
    result = pretrain_no_ray(out, digits_root, name, *SMALL, f"schedule.max_steps={steps}",
                             f"checkpoint.every_steps={steps}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / name


@pytest.fixture(scope="module")
def fine_tunes(digits_root, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("soup_runs")
    pretrained = _train(out, digits_root, "pretrained", 40, "optim.lr=0.2")
    (weights,) = export(resolve(str(pretrained)), "safetensors", out / "pretrained.safetensors")
    # The three fine-tunes run side by side: each is mostly interpreter start-up, one core's worth.
    with ThreadPoolExecutor(len(FINE_TUNES)) as pool:
        runs = [pool.submit(_train, out, digits_root, f"ft_seed{seed}", 15, f"run.seed={seed}", f"optim.lr={lr}",
                            f"model.pretrained_path={weights}") for seed, lr in FINE_TUNES]
        return [run.result() for run in runs]


def _soup(capsys, refs: list[Path], method: str, held_out: Path, output: Path) -> dict:
    code = main(["soup", "--checkpoints", *map(str, refs), "--method", method, "--data", str(held_out),
                 "--output", str(output), "--workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out)


def test_greedy_soup_is_at_least_the_best_ingredient_and_every_stage_takes_it(fine_tunes, digits_root, tmp_path,
                                                                              capsys):
    held_out = digits_root / "labelled" / "val"
    record = _soup(capsys, fine_tunes, "greedy", held_out, tmp_path / "greedy")
    ingredients = record["ingredients"]
    assert sorted(i["ref"] for i in ingredients) == sorted(map(str, fine_tunes))
    accuracies = [i["held_out_acc1"] for i in ingredients]
    assert accuracies == sorted(accuracies, reverse=True) and len(set(accuracies)) > 1  # real, different models
    assert ingredients[0]["kept"]
    assert record["held_out_acc1"] >= max(accuracies) == record["best_ingredient_acc1"]
    assert record["batchnorm"].startswith("averaged")

    # `launch eval classify` on the soup folder scores what the soup recorded: same weights, same numbers.
    soup = resolve(str(tmp_path / "greedy"))
    assert soup.content_sha256 == record["content_sha256"] and soup.model_name == "resnet_nano"
    result = evaluate("classify", soup, held_out, EvalOptions(num_workers=0, device="cpu"))
    assert result["metrics"]["acc1"] == pytest.approx(record["held_out_acc1"], abs=1e-9)
    assert result["metrics"]["label_mapping"].startswith("identity")

    # launch export takes it as --checkpoint.
    assert main(["export", "--checkpoint", str(tmp_path / "greedy"), "--format", "safetensors",
                 "--output", str(tmp_path / "soup.safetensors")]) == 0
    capsys.readouterr()
    assert resolve(str(tmp_path / "soup.safetensors")).content_sha256 == soup.content_sha256

    # A distillation teacher (its preflight checks classes and class names) and model.pretrained_path.
    from pipeline.tasks.distill import DistillClassifierTask, load_teacher

    cfg = Config.from_dict({"data": {"train": str(digits_root / "labelled" / "train"), "image_size_px": 32},
                            "model": {"name": "resnet_nano"}, "distill": {"teacher": str(tmp_path / "greedy")}})
    DistillClassifierTask.check(cfg)
    assert load_teacher(cfg).content_sha256 == soup.content_sha256
    weights = tmp_path / "greedy" / "model.safetensors"
    cfg = Config.from_dict({"data": {"train": "unused", "image_size_px": 32},
                            "model": {"name": "resnet_nano", "pretrained_path": str(weights)}})
    started = families.get("classifier").build(cfg, 10).state_dict()
    for key, value in soup.model.state_dict().items():
        assert torch.equal(started[key], value), key


def test_uniform_soup_is_the_mean_of_every_ingredient_batchnorm_statistics_included(fine_tunes, digits_root,
                                                                                    tmp_path, capsys):
    record = _soup(capsys, fine_tunes, "uniform", digits_root / "labelled" / "val", tmp_path / "uniform")
    assert all(i["kept"] for i in record["ingredients"])
    states = [resolve(str(run)).model.state_dict() for run in fine_tunes]
    soup = resolve(str(tmp_path / "uniform")).model.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "bn1.running_var", "fc.bias"):
        torch.testing.assert_close(soup[key], sum(s[key] for s in states) / 3, rtol=0, atol=1e-6)
    assert not torch.equal(states[0]["bn1.running_mean"], states[1]["bn1.running_mean"])
    assert json.loads((tmp_path / "uniform" / "soup.json").read_text())["method"] == "uniform"


def test_an_incompatible_ingredient_is_refused_in_one_line(fine_tunes, digits_root, tmp_path, capsys):
    # Same architecture, another class count: the head's shape differs.
    raw = Config.from_dict({"data": {"train": "unused", "num_classes": 5, "image_size_px": 32},
                            "model": {"name": "resnet_nano"}}).to_dict()
    other = families.get("classifier").build(Config.from_dict(raw), 5)
    write_our_checkpoint(tmp_path / "five_classes", 7, other.state_dict(), raw)
    code = main(["soup", "--checkpoints", str(fine_tunes[0]), str(tmp_path / "five_classes"), "--method",
                 "greedy", "--data", str(digits_root / "labelled" / "val"), "--output", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == (f"error: soup: {tmp_path / 'five_classes'} cannot join a soup with {fine_tunes[0]}: "
                   "fc.weight has shape (5, 128), not (10, 128)")
    assert not (tmp_path / "no").exists()


def test_clip_checkpoints_soup_on_zero_shot_accuracy_into_an_open_clip_folder(digits_root, tmp_path, capsys):
    # Two CLIP checkpoints of one architecture (no training needed to check the path): held-out accuracy is
    # `launch eval zeroshot`'s top-1, and the soup is an open_clip-dir folder.
    raw = Config.from_dict({"data": {"train": "unused", "image_size_px": 32},
                            "model": {"kind": "clip", "name": "clip-tiny-rn"}}).to_dict()
    refs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = families.get("clip").build(Config.from_dict(raw), None)
        write_our_checkpoint(tmp_path / f"clip{seed}", seed, model.state_dict(), raw)
        refs.append(tmp_path / f"clip{seed}")
    # One shard of the digits zero-shot set (160 images) with its class names and templates: a smaller held-out set.
    held_out = tmp_path / "zeroshot"
    held_out.mkdir()
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copy(digits_root / "zeroshot" / name, held_out / name)
    shutil.copy(digits_root / "zeroshot" / "test" / "1.tar", held_out / "1.tar")
    code = main(["soup", "--checkpoints", *map(str, refs), "--method", "uniform", "--data", str(held_out),
                 "--output", str(tmp_path / "soup"), "--workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    record = json.loads(captured.out)
    assert record["held_out_task"] == "zeroshot" and len(record["ingredients"]) == 2
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["ingredients"][0]["held_out_acc1"] is not None
    assert (tmp_path / "soup" / "open_clip_config.json").is_file()
    soup = resolve(str(tmp_path / "soup"))
    assert (soup.kind, soup.content_sha256) == ("clip", record["content_sha256"])
