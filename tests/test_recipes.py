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
        item = next(batches)
        loss, n = task.loss(model, item.batch)
        assert torch.isfinite(loss) and n == 8 and not item.skips
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert type(optimizer).__name__ == {"resnet50_a3": "Lamb", "resnet50_sgd": "SGD"}[recipe]
    assert getattr(task.loss_fn, "target_threshold", None) == {"resnet50_a3": 0.2, "resnet50_sgd": None}[recipe]
    metrics = task.evaluate(model.eval(), 0, 1)
    assert metrics["samples"] == 360 and 0 <= metrics["top5"] <= 1 and metrics["top1"] <= metrics["top5"]


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_schedules_warm_up_then_decay():
    cfg = load_config(REPO / "configs" / "resnet50_sgd.yaml")
    steps_per_epoch = 10
    lr = [lr_multiplier(s, 900, 50, cfg.schedule, steps_per_epoch) for s in (0, 25, 50, 299, 300, 600, 800)]
    assert lr[0] == pytest.approx(0.125) and lr[1] == pytest.approx(0.5625) and lr[2] == 1.0
    assert lr[3] == 1.0 and lr[4] == pytest.approx(0.1) and lr[5] == pytest.approx(0.01)
    assert lr[6] == pytest.approx(0.001)
    cosine = load_config(REPO / "configs" / "resnet50_a3.yaml").schedule
    values = [lr_multiplier(s, 1000, 100, cosine, 10) for s in (100, 550, 1000)]
    assert values[0] == 1.0 and values[1] == pytest.approx(0.5) and values[2] == pytest.approx(0.0)


# -- every shipped config loads, validates, and says what its sources say ------------------------------

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_all_configs_are_covered():
    # The recipes issue 11 fixed; a new config joins the parametrised test below by existing.
    assert {"resnet50_a3", "resnet50_sgd", "clip_rn50", "clip_vit_b32", "distill_resnet50_fm"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_validates_and_names_real_models(name):
    """Types, choices and cross-field rules (load_config validates); the data paths need not exist."""
    import open_clip
    import timm

    from pipeline.config import Config
    from pipeline.models.clip import check_clip_name
    from pipeline.models.residual import model_factory

    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg  # what travels to the workers rebuilds identically
    assert path.read_text().startswith("#"), "each config opens with the command that runs it"
    if cfg.model.kind == "clip":
        check_clip_name(cfg.model.name)
    else:
        model_factory(cfg.model.name)
    if cfg.distill.teacher_model:
        assert timm.is_model(cfg.distill.teacher_model) or cfg.distill.teacher_model in open_clip.list_models()


def test_resnet50_a3_is_timm_a3():
    """timm's resnet50.a3_in1k pretrained config and the RSB paper's A3 column (Wightman et al. 2021)."""
    import timm

    cfg = load_config(REPO / "configs" / "resnet50_a3.yaml")
    pretrained = timm.create_model("resnet50.a3_in1k", pretrained=False).pretrained_cfg
    assert cfg.data.interpolation == pretrained["interpolation"] == "bicubic"
    assert cfg.data.image_size_px == pretrained["input_size"][-1] == 160
    assert cfg.data.val_image_size_px == pretrained["test_input_size"][-1] == 224
    assert cfg.data.val_crop_pct == pretrained["test_crop_pct"] == 0.95
    assert (cfg.optim.name, cfg.optim.loss, cfg.optim.bce_target_threshold) == ("lamb", "bce", 0.2)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.label_smoothing) == (0.008, 0.02, 0.0)
    assert (cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.global_batch_size) == (0.1, 1.0, 2048)


def test_resnet50_sgd_is_goyal():
    """Goyal et al. 2017: lr 0.1 x batch/256, warmup from 0.1 over 5 epochs, no label smoothing."""
    cfg = load_config(REPO / "configs" / "resnet50_sgd.yaml")
    assert cfg.optim.label_smoothing == 0.0
    assert cfg.optim.lr == pytest.approx(0.1 * cfg.data.global_batch_size / 256)
    assert cfg.schedule.warmup_epochs == 5
    assert cfg.optim.lr * lr_multiplier(0, 900, 50, cfg.schedule, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("name, model", [("clip_rn50", "RN50"), ("clip_vit_b32", "ViT-B-32-quickgelu")])
def test_clip_recipes_use_open_clip_train_constants(name, model):
    """open_clip_train/params.py get_default_params: (0.9, 0.999), 1e-8 for ResNets; (0.9, 0.98), 1e-6 for ViTs."""
    from open_clip_train.params import get_default_params

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    defaults = get_default_params(cfg.model.name)
    assert cfg.model.name == model
    assert cfg.optim.betas == (defaults["beta1"], defaults["beta2"]) and cfg.optim.eps == defaults["eps"]
    assert cfg.data.interpolation == "bicubic"  # open_clip's image_transform default
    assert (cfg.optim.name, cfg.contrastive.loss) == ("adamw", "clip")


def test_clip_vit_b32_is_the_laion400m_e32_run():
    import open_clip

    cfg = load_config(REPO / "configs" / "clip_vit_b32.yaml")
    # open_clip's pretrained.py: laion400m_e32 is a QuickGELU model, registered under ViT-B-32-quickgelu.
    assert "laion400m_e32" in open_clip.list_pretrained_tags_by_model(cfg.model.name)
    assert open_clip.get_model_config(cfg.model.name)["quick_gelu"] is True
    assert open_clip.get_pretrained_cfg("ViT-B-32", "laion400m_e32")["quick_gelu"] is True
    assert not cfg.model.grad_checkpointing  # 256 per GPU fits without recomputation
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.global_batch_size) == (5e-4, 0.2, 32768)


def test_distill_recipe_is_big_vision_bit_i1k():
    """big_vision configs/proj/distill/bit_i1k.py (Beyer et al. 2022): BiT-R152x2 (224 px) -> BiT-R50x1."""
    import timm

    cfg = load_config(REPO / "configs" / "distill_resnet50_fm.yaml")
    assert cfg.model.name == "resnetv2_50x1_bit" and not cfg.model.zero_init_last
    assert cfg.distill.teacher_model == "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"
    teacher = timm.create_model(cfg.distill.teacher_model, pretrained=False).pretrained_cfg
    assert teacher["input_size"] == (3, 224, 224) and cfg.data.image_size_px == 224
    optim = cfg.optim
    assert (optim.name, optim.lr, optim.betas, optim.eps) == ("adamw", 0.03, (0.9, 0.999), 1e-8)
    assert optim.grad_clip_norm == 1.0
    # big_vision adds wd x param after the lr scaling (decay = schedule x 3e-4); torch's AdamW multiplies
    # its weight decay by the scheduled lr, so lr x weight_decay must equal big_vision's wd.
    assert optim.lr * optim.weight_decay == pytest.approx(3e-4)
    assert (cfg.data.global_batch_size, cfg.schedule.epochs, cfg.schedule.kind) == (4096, 1200, "cosine")
    steps_per_epoch = 1_281_167 / 4096
    assert cfg.schedule.warmup_epochs * steps_per_epoch == pytest.approx(5000, rel=0.01)
    assert cfg.schedule.warmup_lr_ratio == 0.0 and cfg.schedule.min_lr_ratio == 0.0
    assert (cfg.data.mixup_alpha, cfg.distill.temperature, cfg.distill.hard_label_weight) == (1.0, 1.0, 0.0)


# -- BCE target threshold ------------------------------------------------------------------------------


def test_bce_target_threshold_binarises_mixed_targets():
    from pipeline.config import OptimSection
    from pipeline.tasks.classify import build_loss

    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0], [0.15, 0.0, 0.85, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.5, 0.5], [0.02, 0.02, 0.02, 0.9, 0.04]])
    loss = build_loss(OptimSection(loss="bce", bce_target_threshold=0.2), mixing=True)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, (soft > 0.2).float())
    assert loss(logits, soft) == pytest.approx(expected.item())
    unthresholded = build_loss(OptimSection(loss="bce"), mixing=True)
    assert unthresholded(logits, soft) == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, soft).item())


@pytest.mark.parametrize("overrides, words", [
    (["optim.loss=ce", "optim.bce_target_threshold=0.2"], "bce only"),
    (["optim.bce_target_threshold=1.5"], "[0, 1)"),
])
def test_bce_target_threshold_validation(overrides, words):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="optim.bce_target_threshold") as info:
        load_config(REPO / "configs" / "resnet50_a3.yaml", overrides)
    assert words in str(info.value)
