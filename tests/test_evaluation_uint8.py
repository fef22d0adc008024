"""Evaluation's uint8 input path (pipeline/evaluation/uint8_input.py) and the CPU speed changes around it
give the model bit-identical inputs, logits and metrics: scores are unchanged to the last digit."""
from __future__ import annotations

import warnings

import numpy as np
import open_clip
import pytest
import timm
import torch
from sklearn.metrics import balanced_accuracy_score
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from pipeline.evaluation import tasks
from pipeline.evaluation.metrics import balanced_accuracy
from pipeline.evaluation.resolver import resolve
from pipeline.evaluation.tasks import EvalOptions, evaluate
from pipeline.evaluation.uint8_input import split_uint8
from test_evaluation_helpers import labelled_samples, random_images, register_tiny_clip, tiny_clip, write_shards

CPU = torch.device("cpu")


def _images(num: int) -> list:
    # Odd sizes and aspect ratios, so Resize and CenterCrop both do real work.
    return [img.resize((37 + 11 * i, 29 + 7 * (i % 5))) for i, img in enumerate(random_images(num, seed=4))]


def _both_ways(transform, images) -> tuple[torch.Tensor, torch.Tensor]:
    split = split_uint8(transform)
    assert split is not None
    plain = torch.stack([transform(img) for img in images])
    uint8 = torch.stack([split.to_uint8(img) for img in images])
    assert uint8.dtype == torch.uint8
    return plain, split.normalise(uint8, CPU)


def test_open_clip_preprocess_split_gives_identical_inputs(tmp_path):
    name = register_tiny_clip(tmp_path)
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    plain, fast = _both_ways(preprocess, _images(12))
    assert torch.equal(plain, fast)


def test_timm_eval_transform_split_gives_identical_inputs():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    plain, fast = _both_ways(create_transform(**resolve_data_config({}, model=model)), _images(6))
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize(8), T.ToTensor()]),                                     # no Normalize
    T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3), T.Lambda(lambda x: x * 2)]),  # float step after
    T.Compose([T.Resize(8), T.ToTensor(), T.Lambda(lambda x: x), T.Normalize((0.5,) * 3, (0.5,) * 3)]),
    lambda img: img,                                                             # not a Compose
])
def test_other_transforms_keep_the_plain_path(transform):
    assert split_uint8(transform) is None


def _toy_set(tmp_path) -> tuple:
    """A registered tiny CLIP (name), its weights file and a 20-image, 4-class zero-shot set in 3 shards."""
    name = register_tiny_clip(tmp_path / "configs")
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip(seed=2).state_dict(), weights)
    data = tmp_path / "toy"
    write_shards(data / "test", labelled_samples(_images(20), [i % 4 for i in range(20)]), per_shard=7)
    (data / "classnames.txt").write_text("apple\nboat\ncat\ndog\n")
    return name, weights, data


def test_zero_shot_logits_identical_with_and_without_the_uint8_path(tmp_path, monkeypatch):
    name, weights, data = _toy_set(tmp_path)
    logits = []
    inner = tasks.evaluate_zero_shot

    def recording(*args, **kwargs):
        from pipeline.evaluation import zero_shot
        keep = zero_shot.classification_metrics
        monkeypatch.setattr(zero_shot, "classification_metrics", lambda lg, tg: (logits.append(lg), keep(lg, tg))[1])
        return inner(*args, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_zero_shot", recording)
    options = EvalOptions(batch_size=8, num_workers=1, device="cpu")
    fast = evaluate("zeroshot", resolve(str(weights), name), data, options)
    monkeypatch.setattr(tasks, "split_uint8", lambda transform: None)
    plain = evaluate("zeroshot", resolve(str(weights), name), data, options)
    assert torch.equal(logits[0], logits[1])
    assert fast["metrics"] == plain["metrics"]


def test_balanced_accuracy_is_sklearns_to_the_bit():
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
        for _ in range(200):
            n, k = int(rng.integers(1, 500)), int(rng.integers(1, 60))
            targets = rng.integers(0, k, n)
            predictions = np.where(rng.random(n) < rng.random(), targets, rng.integers(0, k + 3, n))
            assert balanced_accuracy(targets, predictions) == float(balanced_accuracy_score(targets, predictions))


def test_the_model_sees_channels_last_batches_unless_told_otherwise(tmp_path, monkeypatch):
    """Evaluation hands the model NHWC-memory batches (timm's --channels-last; weights stay NCHW): the same
    pixel values, and logits within float rounding of an NCHW forward; --no-channels-last gives NCHW."""
    name, weights, data = _toy_set(tmp_path)
    seen: list[tuple[bool, torch.Tensor]] = []
    logits = []
    from pipeline.evaluation import zero_shot
    keep = zero_shot.classification_metrics
    monkeypatch.setattr(zero_shot, "classification_metrics", lambda lg, tg: (logits.append(lg), keep(lg, tg))[1])
    for channels_last in (True, False):
        resolved = resolve(str(weights), name)
        encode = resolved.model.encode_image

        def recording(images, *args, **kwargs):
            seen.append((channels_last, images))
            return encode(images, *args, **kwargs)

        monkeypatch.setattr(resolved.model, "encode_image", recording)
        evaluate("zeroshot", resolved, data, EvalOptions(batch_size=8, num_workers=1, device="cpu",
                                                         channels_last=channels_last))
    nhwc = [images for flag, images in seen if flag]
    nchw = [images for flag, images in seen if not flag]
    assert nhwc and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in nhwc)
    assert nchw and all(x.is_contiguous() for x in nchw)
    assert all(torch.equal(a, b) for a, b in zip(nhwc, nchw))  # same values, other memory order
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def test_no_channels_last_on_the_command_line():
    import argparse

    from launch import eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_parser(parser.add_subparsers())
    common = ["--checkpoint", "x.pt", "--data", "d"]
    assert eval_cmd._options(parser.parse_args(["eval", "zeroshot", *common])).channels_last
    assert not eval_cmd._options(parser.parse_args(["eval", "zeroshot", *common, "--no-channels-last"])).channels_last
