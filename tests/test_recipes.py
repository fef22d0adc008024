"""The shipped recipes build and step for real on the CPU (tiny model swapped in, digits data)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.stream import Position
from pipeline.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups
from pipeline.tasks.classify import ClassifyTask

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("recipe", ["resnet50_a3", "resnet50_sgd"])
def test_recipe_trains_a_few_steps(recipe, digits_root):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [
        f"data.train={digits_root}/labelled/train", f"data.val={digits_root}/labelled/val",
        "data.batch_size_per_rank=8", "data.global_batch_size=null", "data.num_workers_per_rank=0",
        "data.image_size_px=32", "data.val_image_size_px=32", "model.name=resnet_nano", "ray.num_workers=1",
    ])
    task = ClassifyTask(cfg, torch.device("cpu"))
    model = task.build_model()
    optimizer = build_optimizer(task.param_groups(model), cfg.optim)
    scheduler = build_scheduler(optimizer, 100, 10, cfg.schedule, 20)
    batches = task.train_batches(0, 1, Position())
    for _ in range(3):
        batch, skipped, _ = next(batches)
        loss, n = task.loss(model, batch)
        assert torch.isfinite(loss) and n == 8 and not skipped
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert type(optimizer).__name__ == {"resnet50_a3": "Lamb", "resnet50_sgd": "SGD"}[recipe]
    metrics = task.evaluate(model.eval(), 0, 1)
    assert metrics["samples"] == 360 and 0 <= metrics["top1"] <= 100


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_schedules_warm_up_then_decay():
    cfg = load_config(REPO / "configs" / "resnet50_sgd.yaml")
    steps_per_epoch = 10
    lr = [lr_multiplier(s, 900, 50, cfg.schedule, steps_per_epoch) for s in (0, 25, 50, 299, 300, 600, 800)]
    assert lr[0] == pytest.approx(0.1) and lr[1] == pytest.approx(0.55) and lr[2] == 1.0
    assert lr[3] == 1.0 and lr[4] == pytest.approx(0.1) and lr[5] == pytest.approx(0.01)
    assert lr[6] == pytest.approx(0.001)
    cosine = load_config(REPO / "configs" / "resnet50_a3.yaml").schedule
    values = [lr_multiplier(s, 1000, 100, cosine, 10) for s in (100, 550, 1000)]
    assert values[0] == 1.0 and values[1] == pytest.approx(0.5) and values[2] == pytest.approx(0.0)
