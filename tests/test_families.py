"""Model families (pipeline.families): every registered family fills in every field and keeps its contract on a
tiny model, a miss names the valid kinds, and a third family registered here, without editing the registry
file, is found by every stage that asks (training task, weight decay, eval transform, features, eval tasks)."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from PIL import Image

from pipeline import families
from pipeline.config import Config, ConfigError
from pipeline.families.spec import ModelFamily, Rebuilt
from pipeline.optim import param_groups

# A tiny config per registered family: a family added to the registry needs one here.
TINY = {
    "classifier": {"data": {"train": "unused", "num_classes": 3, "image_size_px": 32, "val_crop_pct": 1.0},
                   "model": {"kind": "classifier", "name": "resnet_nano"}},
    "clip": {"data": {"train": "unused", "image_size_px": 32}, "model": {"kind": "clip", "name": "clip-tiny-rn"}},
}
OPTIONAL_FIELDS = {"distill_task", "tokenizer", "hub_folder"}  # None means "this family has none"


def _same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    # Our CLIP keeps a 1-element logit scale for DeepSpeed where open_clip's is 0-d: compare values, not shapes.
    return a.keys() == b.keys() and all(torch.equal(a[k].reshape(-1), b[k].reshape(-1)) for k in a)


def test_the_registry_lists_every_family_with_a_tiny_config_here():
    assert families.names() == sorted(TINY)
    assert [f.name for f in families.all_families()] == list(families.FAMILIES)
    libraries = [f.library for f in families.all_families()]
    assert len(set(libraries)) == len(libraries)  # --model LIBRARY:NAME and --format pick one family


@pytest.mark.parametrize("kind", sorted(families.FAMILIES))
def test_every_family_implements_every_field(kind):
    from pipeline.evaluation.tasks import EVAL_TASKS
    from pipeline.tasks.base import Task

    family = families.get(kind)
    for field in dataclasses.fields(ModelFamily):  # annotations are strings here (from __future__ import annotations)
        value = getattr(family, field.name)
        if value is None:
            assert field.name in OPTIONAL_FIELDS, f"{kind}: {field.name} is not set"
        elif "Callable" in field.type:
            assert callable(value), f"{kind}: {field.name} is not callable"
        elif field.type.startswith("tuple"):
            assert isinstance(value, tuple) and all(isinstance(v, str) for v in value), f"{kind}: {field.name}"
        elif "HubFolder" in field.type:
            assert value.format and value.config_file and value.weights_file and callable(value.config), kind
        else:
            assert isinstance(value, str) and value, f"{kind}: {field.name} is empty"
    assert family.name == kind and family.data_kind in ("labelled", "image_text")
    assert set(family.eval_tasks) <= set(EVAL_TASKS) and family.eval_tasks
    for spec in filter(None, (family.task, family.distill_task)):
        module, name = spec.split(":")
        assert issubclass(getattr(importlib.import_module(module), name), Task), spec


@pytest.mark.parametrize("kind", sorted(families.FAMILIES))
def test_every_family_keeps_its_contract_on_a_tiny_model(kind, tmp_path):
    family = families.get(kind)
    cfg = Config.from_dict(TINY[kind])
    assert families.check_config(cfg) is family
    torch.manual_seed(0)
    model = family.build(cfg, 3).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert family.has_architecture(cfg.model.name) and not family.has_architecture("no-such-architecture")

    rebuilt = family.from_checkpoint(cfg, state)  # one of our checkpoints: every weight, strictly
    assert isinstance(rebuilt, Rebuilt) and _same_values(rebuilt.model.state_dict(), state)
    outside = family.from_weights(cfg.model.name, state, "weights.pt")  # its library's file of the same weights
    assert _same_values(outside.model.state_dict(), state)
    with pytest.raises(ValueError, match=f"weights.pt: weights do not match model {cfg.model.name}"):
        family.load_state(family.build(cfg, 3), dict(list(state.items())[1:]), "weights.pt", cfg.model.name)

    pixels = rebuilt.preprocess(Image.new("RGB", (40, 36), (120, 30, 200)))
    assert pixels.shape == (3, 32, 32)
    assert family.eval_transform(rebuilt.model, cfg) is not None
    with torch.no_grad():
        features = family.features(rebuilt.model.eval(), torch.stack([pixels, pixels]))
    assert features.ndim == 2 and features.shape[0] == 2

    decay, no_decay = param_groups(model, 0.1, exempt=family.no_weight_decay)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    if family.tokenizer is not None:
        assert family.tokenizer(cfg.model.name)(["a photo of a seven"]).ndim == 2
    written = family.export_files(cfg.model.name, rebuilt.model_config, tmp_path / "model.safetensors")
    assert all(path.is_file() for path in written)


def test_a_miss_names_the_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown model kind 'nope' \(valid: classifier, clip\)"):
        families.get("nope")


@pytest.mark.parametrize("raw, key, words", [
    ({"model": {"kind": "nope"}}, "model.kind", "must be one of classifier, clip, got 'nope'"),
    ({"model": {"kind": "clip"}, "contrastive": {"loss": "triplet"}}, "contrastive.loss",
     "must be one of clip, siglip"),
    ({"eval": {"zeroshot": ["cifar=/data/cifar"]}}, "eval.zeroshot", "zero-shot sets need model.kind: clip"),
])
def test_family_checks_name_the_key_and_the_file(raw, key, words):
    cfg = Config.from_dict({"data": {"train": "x"}, **raw})  # the generic half passes: these are the family's
    with pytest.raises(ConfigError) as info:
        families.check_config(cfg, "run.yaml")
    assert str(info.value).startswith(f"run.yaml: {key}: ") and words in str(info.value), str(info.value)


# -- a third family, registered by this test alone -----------------------------------------------------

from pipeline.tasks.classify import ClassifyTask  # noqa: E402


def _batch(images: torch.Tensor, labels: list[int]):
    """One evaluation batch as the eval stream yields it."""
    from collections import Counter

    from pipeline.data.eval_batches import Batch
    from pipeline.data.stream import StreamBatch

    keys = [f"toy/{i}" for i in range(len(labels))]
    return StreamBatch(Batch(images=images, labels=torch.tensor(labels), keys=keys), Counter())


class ToyTask(ClassifyTask):
    """The toy family's training task: a classifier's, found through the family's 'module:Class' string."""


def _toy_transform(model, cfg):
    return lambda image: torch.full((3, 8, 8), 0.5)


def _toy_features(model, images):
    return images.flatten(1)[:, :5] * 2


def _toy_from_checkpoint(cfg, state):
    model = TOY.build(cfg, cfg.data.num_classes)
    TOY.load_state(model, state, "checkpoint", cfg.model.name)
    return Rebuilt(model, TOY.eval_transform(model, cfg))


CLASSIFIER = families.get("classifier")
TOY = dataclasses.replace(
    CLASSIFIER, name="toy", library="toylib", task=f"{__name__}:ToyTask", distill_task=None,
    eval_tasks=("linear-probe",), from_checkpoint=_toy_from_checkpoint, eval_transform=_toy_transform,
    features=_toy_features, no_weight_decay=lambda name, param: True,
    export_files=lambda name, model_config, output: [])


def test_a_third_family_is_found_by_every_stage_that_asks(digits_root, tmp_path):
    from pipeline.evaluation.export import export_formats
    from pipeline.evaluation.linear_probe import extract_features
    from pipeline.evaluation.resolver import resolve
    from pipeline.evaluation.runtime import SkipTally
    from pipeline.evaluation.tasks import can_run, needed_kinds
    from pipeline.tasks import task_class
    from test_evaluation_helpers import write_our_checkpoint

    raw = {"data": {"train": str(digits_root / "labelled" / "train"), "num_classes": 10, "image_size_px": 32},
           "model": {"kind": "toy", "name": "resnet_nano"}}
    with families.registered(TOY):
        assert families.get("toy") is TOY and "toy" in families.names()
        cfg = Config.from_dict(raw)
        # Training: the task class, the model and the weight-decay rule all come from the family.
        assert task_class(cfg) is ToyTask
        task = ToyTask(cfg, torch.device("cpu"))
        model = task.build_model()
        (group,) = task.param_groups(model)  # the toy rule exempts everything: one group without decay
        assert group["weight_decay"] == 0.0 and len(group["params"]) == len(list(model.parameters()))
        # Evaluation: our checkpoint resolves through the family, with its eval transform and features.
        write_our_checkpoint(tmp_path / "run", 10, model.state_dict(), Config.from_dict(raw).to_dict())
        resolved = resolve(str(tmp_path / "run"))
        assert (resolved.kind, resolved.library) == ("toy", "toylib")
        assert resolved.preprocess(Image.new("RGB", (4, 4))).shape == (3, 8, 8)
        batches = [_batch(torch.ones(2, 3, 8, 8), [0, 1])]
        features, labels = extract_features(resolved.model, "toy", batches, torch.device("cpu"), SkipTally(), "toy")
        assert features.shape == (2, 5) and (features == 2).all() and labels.tolist() == [0, 1]
        assert can_run("linear-probe", resolved) and not can_run("classify", resolved)
        assert needed_kinds("linear-probe") == "clip or classifier or toy"
        assert "toylib" in export_formats()
        with pytest.raises(ConfigError, match="zero-shot sets need model.kind: clip"):
            families.check_config(Config.from_dict({**raw, "eval": {"zeroshot": ["x=/y"]}}))
    with pytest.raises(ValueError, match=r"\(valid: classifier, clip\)"):
        families.get("toy")
