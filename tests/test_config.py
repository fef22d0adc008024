"""Config loading and validation: every mistake is one line naming the key and the file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke_resnet.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_smoke_config_loads_with_types():
    cfg = load_config(SMOKE)
    assert cfg.model.name == "resnet_tiny"
    assert cfg.deepspeed.zero_stage == 2
    assert isinstance(cfg.optim.lr, float)
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert Config.from_dict(cfg.to_dict()) == cfg  # what travels to workers rebuilds identically


def test_override_sets_any_key_with_yaml_types():
    cfg = load_config(SMOKE, ["optim.lr=0.5", "ray.num_workers=4", "model.drop_path_rate=0.1",
                              "data.randaugment=rand-m6-mstd0.5", "schedule.max_steps=null"])
    assert (cfg.optim.lr, cfg.ray.num_workers, cfg.model.drop_path_rate) == (0.5, 4, 0.1)
    assert cfg.data.randaugment == "rand-m6-mstd0.5" and cfg.schedule.max_steps is None


@pytest.mark.parametrize("text, key, words", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr", "unknown key"),
    ("optimizer:\n  lr: 0.1\n", "optimizer", "unknown section"),
    ("optim:\n  lr: fast\n", "optim.lr", "expected a number"),
    ("optim:\n  lr: -0.1\n", "optim.lr", "must be > 0"),
    ("deepspeed:\n  zero_stage: 5\n", "deepspeed.zero_stage", "0-3"),
    ("data:\n  batch_size_per_rank: 1.5\n", "data.batch_size_per_rank", "integer"),
    ("data:\n  batch_size_per_rank: 32\n  global_batch_size: 100\nray:\n  num_workers: 2\n",
     "data.global_batch_size", "32 x 1 x 2 = 64"),
    ("model:\n  zero_init_last: maybe\n", "model.zero_init_last", "true or false"),
    ("optim:\n  name: rmsprop\n", "optim.name", "one of"),
    ("optim:\n  betas: [0.9]\n", "optim.betas", "expected 2 values"),
    ("data:\n  mixup_alpha: 0.2\n  batch_size_per_rank: 33\n", "data.batch_size_per_rank", "even"),
    ("optim:\n  ema_decay: 0.999\ndeepspeed:\n  zero_stage: 3\n", "optim.ema_decay", "zero_stage"),
    ("optim: [1, 2]\n", "optim", "mapping"),
    ("optim:\n  lr: [0.1\n", "line", "invalid YAML"),
])
def test_bad_config_names_key_and_file(tmp_path, text, key, words):
    path = write(tmp_path, "data:\n  train: x\n" + text if "data:" not in text else text.replace("data:\n", "data:\n  train: x\n", 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and key in message and words in message, message
    assert "\n" not in message


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(SMOKE, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(SMOKE, ["lr=1"])


def run_launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration  # `python -m launch` subprocesses
def test_cli_bad_config_is_one_line_without_traceback(tmp_path):
    path = write(tmp_path, "data:\n  train: shards/\noptim:\n  lr: -1\n")
    result = run_launch("pretrain", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {path}: optim.lr: must be > 0, got -1.0"], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.integration  # `python -m launch` subprocesses
def test_cli_missing_shards_stops_before_workers(tmp_path):
    path = write(tmp_path, "data:\n  train: no/such/folder\n  num_classes: 10\n")
    result = run_launch("pretrain", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "data.train" in result.stderr and str(path) in result.stderr
    assert "no/such/folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started or written


@pytest.mark.integration  # `python -m launch` subprocesses
def test_cli_too_few_samples_for_one_global_batch(tmp_path, digits_root):
    path = write(tmp_path, f"data:\n  train: {digits_root}/labelled/val\n  batch_size_per_rank: 4096\n")
    result = run_launch("pretrain", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "data.batch_size_per_rank" in result.stderr, result.stderr
    assert "fewer than one global batch" in result.stderr


@pytest.mark.parametrize("name", ["resnet50_a3", "resnet50_sgd", "smoke_resnet", "smoke_distill",
                                  "distill_resnet50_fm"])
def test_shipped_recipes_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.kind == "classifier"


def test_keyword_keys_are_written_as_users_write_them(tmp_path):
    """eval.async is a Python keyword: the field is async_, the YAML key and what travels is `async`."""
    cfg = load_config(write(tmp_path, SMOKE.read_text() + "\neval:\n  async: true\n"),
                      ["run.trackers=[tensorboard, mlflow]", "contrastive.matryoshka_dims=[8, 16]"])
    assert cfg.eval.async_ is True and cfg.run.trackers == ("tensorboard", "mlflow")
    assert cfg.to_dict()["eval"]["async"] is True and "async_" not in cfg.to_dict()["eval"]
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, key", [
    ("run.trackers=[tensorboard, comet]", "run.trackers"),
    ("run.trackers=[mlflow, mlflow]", "run.trackers"),
    ("contrastive.matryoshka_dims=[8, 8]", "contrastive.matryoshka_dims"),
    ("contrastive.matryoshka_weights=[1.0]", "contrastive.matryoshka_weights"),
    ("eval.async_=true", "eval.async_"),
    ("run.profile_steps=[5]", "run.profile_steps"),
    ("run.profile_steps=[4, 2]", "run.profile_steps"),
    ("run.profile_steps=[0, 2]", "run.profile_steps"),
])
def test_tracker_matryoshka_and_async_mistakes_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert err.value.key == key
