"""Evaluators against independent computations: zero-shot vs CLIP_benchmark's recipe, retrieval vs
brute force, linear probe on separable features, classify on a model with a known output."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from pipeline.data import reasons
from pipeline.evaluation import datasets
from pipeline.evaluation.linear_probe import fit_and_score
from pipeline.evaluation.linear_probe_adamw import (FIRST_INDICES, WEIGHT_DECAYS, fit_and_score_adamw,
                                                    train_probe, tune_weight_decay)
from pipeline.evaluation.resolver import resolve
from pipeline.evaluation.retrieval import recall_metrics
from pipeline.evaluation.tasks import EvalOptions, dataset_zero_shot_prompts, evaluate, write_result
from test_evaluation_helpers import (labelled_samples, random_images, register_tiny_clip, tiny_clip,
                                     write_shards)

CLASSNAMES = ["apple", "boat", "cat", "dog", "eagle", "fish", "goat", "house", "island", "jeep"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c}."]
OPTIONS = EvalOptions(batch_size=16, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    name = register_tiny_clip(folder / "configs")
    path = folder / "tiny.pt"
    torch.save(tiny_clip(seed=1).state_dict(), path)
    return name, path


# -- zero-shot --------------------------------------------------------------------------------------


def clip_benchmark_zero_shot(model, tokenizer, preprocess, images, labels):
    """CLIP_benchmark's metrics/zeroshot_classification.py, restated: per-class classifier columns,
    logits = 100 * img @ W, top-k, balanced accuracy."""
    with torch.no_grad():
        weights = []
        for classname in CLASSNAMES:
            texts = tokenizer([t.format(c=classname) for t in TEMPLATES])
            embedding = F.normalize(model.encode_text(texts), dim=-1).mean(dim=0)
            embedding /= embedding.norm()
            weights.append(embedding)
        classifier = torch.stack(weights, dim=1)
        pixels = torch.stack([preprocess(img) for img in images])
        logits = 100.0 * F.normalize(model.encode_image(pixels), dim=-1) @ classifier
    target = torch.tensor(labels)
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    acc1 = correct[:1].reshape(-1).float().sum().item() / len(target)
    acc5 = correct[:5].reshape(-1).float().sum().item() / len(target)
    recall = balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}, logits.argmax(dim=1)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_zero_shot_matches_clip_benchmark(tmp_path, clip_weights):
    name, weights = clip_weights
    # The reference loads the weights through open_clip itself, not through our resolver.
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    images = random_images(60, seed=3)
    # Label half the images with the reference's own prediction: accuracy lands well above chance,
    # so a wrong classifier, template or preprocessing would show.
    _, predicted = clip_benchmark_zero_shot(model, tokenizer, preprocess, images, [0] * len(images))
    rng = np.random.default_rng(0)
    labels = [int(p) if i % 2 == 0 else int(rng.integers(0, 10)) for i, p in enumerate(predicted)]
    expected, _ = clip_benchmark_zero_shot(model, tokenizer, preprocess, images, labels)
    assert expected["acc1"] >= 0.5

    data = tmp_path / "wds_toy"
    write_shards(data / "test", labelled_samples(images, labels), per_shard=25)
    (data / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (data / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    result = evaluate("zeroshot", resolve(str(weights), name), data, OPTIONS)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(result["metrics"][key] - expected[key]) * 100 <= 0.1, key
    assert result["metrics"]["num_samples"] == 60
    assert result["metrics"]["num_skipped"] == {}
    assert result["metrics"]["classnames"] == "dataset"
    assert result["task"] == "zeroshot_classification" and result["dataset"] == "wds_toy"


def test_zero_shot_falls_back_to_imagenet_metadata(tmp_path):
    classnames, templates, info = dataset_zero_shot_prompts(tmp_path, "test")
    assert len(classnames) == 1000 and classnames[0] == "tench"
    assert len(templates) == 80 and callable(templates[0])
    assert info == {"classnames": "imagenet", "templates": "openai_imagenet", "num_classes": 1000,
                    "num_templates": 80}


def test_bad_samples_are_counted_not_fatal(tmp_path, clip_weights):
    name, weights = clip_weights
    images = random_images(8, seed=5)
    samples = labelled_samples(images, [i % 3 for i in range(8)])
    samples += [{"cls": b"1"}, {"png": b"not a png", "cls": b"2"}, {"png": samples[0]["png"], "cls": b"x"}]
    data = tmp_path / "toy"
    write_shards(data / "test", samples, per_shard=4)
    (data / "classnames.txt").write_text("a\nb\nc\n")
    (data / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    # Two worker processes: the skip counts must come back from both.
    options = EvalOptions(batch_size=16, num_workers=2, device="cpu")
    result = evaluate("zeroshot", resolve(str(weights), name), data, options)
    assert result["metrics"]["num_samples"] == 8
    assert result["metrics"]["num_skipped"] == {reasons.BAD_LABEL: 1, reasons.NO_IMAGE: 1, reasons.CORRUPT_IMAGE: 1}
    assert result["metrics"]["acc5"] is None  # fewer than 5 classes, as CLIP_benchmark (NaN there)
    write_result(result, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["metrics"]["acc5"] is None


# -- retrieval --------------------------------------------------------------------------------------


def brute_force_recalls(image_emb, text_emb, owners, ks):
    scores = (text_emb @ image_emb.T).numpy()
    out = {}
    for k in ks:
        text_queries = [owners[t] in np.argsort(-scores[t])[:k] for t in range(len(owners))]
        image_queries = []
        for i in range(len(image_emb)):
            ranked = np.argsort(-scores[:, i])[:k]
            image_queries.append(any(owners[t] == i for t in ranked))
        out[f"image_retrieval_recall@{k}"] = float(np.mean(text_queries))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(image_queries))
    return out


def test_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    image_emb = F.normalize(torch.randn(37, 8, generator=gen), dim=-1)
    counts = torch.randint(1, 5, (37,), generator=gen)
    owners = torch.repeat_interleave(torch.arange(37), counts)
    text_emb = F.normalize(image_emb[owners] + 0.9 * torch.randn(len(owners), 8, generator=gen), dim=-1)
    ours = recall_metrics(image_emb, text_emb, owners, ks=(1, 5, 10))
    expected = brute_force_recalls(image_emb, text_emb, owners.tolist(), (1, 5, 10))
    assert ours == pytest.approx(expected, abs=1e-9)
    assert 0 < ours["image_retrieval_recall@1"] < 1  # neither trivial nor hopeless


def test_recall_hand_computed_case():
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0 owns captions 0 and 1, image 1 owns caption 2; caption 1 points at the wrong image.
    text_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    metrics = recall_metrics(image_emb, text_emb, torch.tensor([0, 0, 1]), ks=(1, 5))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    # image 0's best caption is caption 0 (hit); image 1's best is caption 1 (owned by image 0): miss.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 2)
    assert metrics["image_retrieval_recall@5"] == 1.0 and metrics["text_retrieval_recall@5"] == 1.0


def test_retrieval_end_to_end(tmp_path, clip_weights):
    name, weights = clip_weights
    images = random_images(12, seed=7)
    captions = [[f"a picture number {i}", f"photo {i} of things", "something"][: 1 + i % 3] for i in range(12)]
    samples = [{"png": s["png"], "txt": "\n".join(c)} for s, c in zip(labelled_samples(images, [0] * 12), captions)]
    data = tmp_path / "wds_captions"
    write_shards(data / "test", samples, per_shard=5)
    (data / "dataset_type.txt").write_text("retrieval\n")
    resolved = resolve(str(weights), name)
    result = evaluate("retrieval", resolved, data, OPTIONS)

    with torch.no_grad():
        model, tokenizer = resolved.model, resolved.tokenizer
        image_emb = F.normalize(model.encode_image(torch.stack([resolved.preprocess(i) for i in images])), dim=-1)
        flat = [c for cs in captions for c in cs]
        text_emb = F.normalize(model.encode_text(tokenizer(flat)), dim=-1)
    owners = [i for i, cs in enumerate(captions) for _ in cs]
    expected = brute_force_recalls(image_emb, text_emb, owners, (1, 5, 10))
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert result["metrics"]["num_captions"] == len(flat) and result["task"] == "zeroshot_retrieval"


# -- linear probe -----------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 4
    def blobs(n):
        labels = rng.integers(0, 4, n)
        return (centers[labels] + rng.normal(size=(n, 16))).astype(np.float32), labels
    train_x, train_y = blobs(200)
    test_x, test_y = blobs(100)
    metrics = fit_and_score(train_x, train_y, test_x, test_y)
    assert metrics["acc1"] >= 0.95
    assert metrics["acc5"] is None and metrics["mean_per_class_recall"] >= 0.95
    assert metrics["regularization_C"] in np.logspace(-3, 4, 8)


def _blobs(seed: int, n_train: int = 200, n_test: int = 100, classes: int = 4, dim: int = 16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 4

    def draw(n):
        labels = rng.integers(0, classes, n)
        return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels
    return (*draw(n_train), *draw(n_test))


def test_clip_benchmark_probe_separates_separable_features():
    train_x, train_y, test_x, test_y = _blobs(0)
    metrics = fit_and_score_adamw(train_x, train_y, test_x, test_y, batch_size=64, seed=0)
    assert metrics["acc1"] >= 0.95 and metrics["mean_per_class_recall"] >= 0.95
    assert metrics["weight_decay"] in WEIGHT_DECAYS and metrics["val_acc1"] >= 0.9
    assert (metrics["lr"], metrics["epochs"], metrics["batch_size"]) == (0.1, 10, 64)
    assert (metrics["num_train"], metrics["num_val"], metrics["num_test"]) == (200, 40, 100)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y).long()
    first, second = (train_probe(x, y, 4, 1e-3, batch_size=64, seed=0) for _ in range(2))
    assert torch.equal(first.weight, second.weight)  # a probe is a function of its seed: sweep results repeat


def clip_benchmark_cosine_lr(base_lr, warmup_length, steps):
    """CLIP_benchmark's metrics/linear_probe.py cosine_lr, restated for one parameter group."""
    def lr_at(step):
        if step < warmup_length:
            return base_lr * (step + 1) / warmup_length
        return 0.5 * (1 + np.cos(np.pi * (step - warmup_length) / (steps - warmup_length))) * base_lr
    return lr_at


def test_clip_benchmark_probe_trains_as_clip_benchmark_does():
    """One minibatch per epoch (so no shuffle order to match): the same AdamW steps at its cosine lr."""
    train_x, train_y, _, _ = _blobs(3, n_train=48)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y).long()
    ours = train_probe(x, y, 4, 0.01, lr=0.1, epochs=5, batch_size=64, seed=7)
    torch.manual_seed(7)
    reference = torch.nn.Linear(16, 4)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.01)
    lr_at = clip_benchmark_cosine_lr(0.1, 0.0, 5)
    for step in range(5):
        optimizer.param_groups[0]["lr"] = lr_at(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    assert torch.allclose(ours.weight, reference.weight, atol=1e-6)
    assert torch.allclose(ours.bias, reference.bias, atol=1e-6)


def test_clip_benchmark_weight_decay_search():
    """Its grid and search: 7 coarse points of logspace(-6, 2, 97), then spans 8, 4, 2, 1 around the peak."""
    assert len(WEIGHT_DECAYS) == 97 and WEIGHT_DECAYS[0] == pytest.approx(1e-6) and WEIGHT_DECAYS[-1] == 100
    assert [WEIGHT_DECAYS[i] for i in FIRST_INDICES] == pytest.approx(list(np.logspace(-6, 2, 7)))
    for peak in (0, 23, 37, 58, 96):
        tried = []

        def unimodal(index, peak=peak):
            tried.append(index)
            return 1.0 - abs(index - peak) / 200
        assert tune_weight_decay(unimodal) == peak
        assert tried[:7] == list(FIRST_INDICES) and len(tried) == 7 + 3 * 4
    assert tune_weight_decay(lambda index: 0.0) == 0  # nothing beats 0%: its first grid point
    assert tune_weight_decay(lambda index: 0.5) == 0  # ties keep the first one tried


@pytest.mark.parametrize("method", ["logistic_regression", "clip_benchmark"])
def test_linear_probe_end_to_end(tmp_path, clip_weights, method):
    name, weights = clip_weights
    # Two classes that differ in brightness: a random ViT's features still separate them.
    dark = [img.point(lambda v: v // 4) for img in random_images(20, seed=11)]
    bright = [img.point(lambda v: 192 + v // 4) for img in random_images(20, seed=12)]
    images, labels = dark + bright, [0] * 20 + [1] * 20
    order = np.random.default_rng(1).permutation(40)
    samples = labelled_samples([images[i] for i in order], [labels[i] for i in order])
    data = tmp_path / "probe"
    write_shards(data / "train", samples[:28], per_shard=10)
    write_shards(data / "test", samples[28:], per_shard=10)
    options = dataclasses.replace(OPTIONS, probe_method=method)
    result = evaluate("linear-probe", resolve(str(weights), name), data, options)
    assert result["metrics"]["acc1"] >= 0.9 and result["metrics"]["method"] == method
    assert result["metrics"]["num_train"] == 28 and result["metrics"]["num_test"] == 12
    assert ("weight_decay" in result["metrics"]) == (method == "clip_benchmark")
    assert ("regularization_C" in result["metrics"]) == (method == "logistic_regression")
    with pytest.raises(ValueError, match="unknown method 'svm' .valid: logistic_regression, clip_benchmark"):
        evaluate("linear-probe", resolve(str(weights), name), data, dataclasses.replace(OPTIONS, probe_method="svm"))


# -- classify ---------------------------------------------------------------------------------------


def test_classify_on_a_model_with_known_output(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    ranking = [3, 1, 4, 0, 2, 6, 5]  # the logit order every image gets: the head ignores its input
    with torch.no_grad():
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.copy_(torch.tensor([7.0 - ranking.index(c) for c in range(7)]))
    weights = tmp_path / "known.pth"
    torch.save({"state_dict": model.state_dict()}, weights)

    labels = [3, 3, 1, 4, 0, 2, 6, 5, 5, 3]
    data = tmp_path / "labelled"
    write_shards(data, labelled_samples(random_images(10, seed=2), labels), per_shard=4)  # flat layout
    result = evaluate("classify", resolve(str(weights), "test_resnet"), data, OPTIONS)
    assert result["metrics"]["acc1"] == pytest.approx(3 / 10)
    assert result["metrics"]["acc5"] == pytest.approx(sum(l in ranking[:5] for l in labels) / 10)
    # balanced accuracy: class 3 has recall 1, the other 6 classes present have 0.
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(1 / 7)
    assert result["task"] == "classification"


def test_topk_counts_k_past_the_number_of_classes_as_correct():
    """Training validation and every evaluator count top-k with one function; k past the classes is clamped
    (timm's rule): each row is correct there. Hand-computed on 3 classes."""
    from pipeline.evaluation.metrics import classification_metrics, topk_accuracy, topk_correct

    logits = torch.tensor([[0.1, 0.7, 0.2],     # ranking 1, 2, 0; target 1: top-1
                           [0.9, 0.04, 0.06],   # ranking 0, 2, 1; target 2: top-2
                           [0.3, 0.25, 0.45],   # ranking 2, 0, 1; target 0: top-2
                           [0.2, 0.5, 0.3]])    # ranking 1, 2, 0; target 0: top-3 only
    targets = torch.tensor([1, 2, 0, 0])
    assert topk_correct(logits, targets, (1, 2, 3, 5, 100)) == {1: 1, 2: 3, 3: 4, 5: 4, 100: 4}
    assert topk_accuracy(logits, targets, 1) == 0.25 and topk_accuracy(logits, targets, 5) == 1.0
    # launch eval's files follow CLIP_benchmark instead: no acc5 below 5 classes (NaN there, null here)
    assert classification_metrics(logits, targets)["acc5"] is None


def test_result_records_provenance(tmp_path, clip_weights):
    name, weights = clip_weights
    data = tmp_path / "toy"
    write_shards(data / "test", labelled_samples(random_images(4, seed=1), [0, 1, 0, 1]), per_shard=4)
    (data / "classnames.txt").write_text("a\nb\n")
    (data / "manifest.json").write_text(json.dumps({"kind": "zeroshot", "num_samples": 4}))
    resolved = resolve(str(weights), name)
    result = evaluate("zeroshot", resolved, data, OPTIONS)
    assert set(result) >= {"dataset", "model", "pretrained", "task", "metrics", "checkpoint_step",
                           "checkpoint_sha256", "manifest_sha256"}
    import hashlib
    assert result["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    assert result["checkpoint_sha256"] == resolved.content_sha256 and len(resolved.content_sha256) == 64
    assert result["model"] == name and result["checkpoint_step"] is None


def test_cpu_forward_leaves_the_workers_their_cores(tmp_path, clip_weights, monkeypatch):
    """On the CPU the forward runs on the cores the loader workers leave (its OpenMP threads would spin on
    theirs), and the previous thread count comes back afterwards."""
    from pipeline.evaluation import runtime, tasks

    name, weights = clip_weights
    data = tmp_path / "toy"
    write_shards(data / "test", labelled_samples(random_images(4, seed=1), [0, 1, 0, 1]), per_shard=4)
    (data / "classnames.txt").write_text("a\nb\n")
    seen = []
    inner = tasks.evaluate_zero_shot
    monkeypatch.setattr(tasks, "evaluate_zero_shot", lambda *a, **k: (seen.append(torch.get_num_threads()),
                                                                      inner(*a, **k))[1])
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "usable_cpus", lambda: before + 3)  # so the count differs from torch's own
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    evaluate("zeroshot", resolve(str(weights), name), data, dataclasses.replace(OPTIONS, num_workers=1))
    assert seen == [before + 2] and torch.get_num_threads() == before
    assert runtime.forward_threads(num_workers=4, cpus=2) == 1


def test_task_needs_the_right_model_kind(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "r.pth")
    data = tmp_path / "d"
    write_shards(data, labelled_samples(random_images(2, seed=0), [0, 1]), per_shard=2)
    with pytest.raises(ValueError, match="needs a clip model"):
        evaluate("zeroshot", resolve(str(tmp_path / "r.pth"), "test_resnet"), data, OPTIONS)
    with pytest.raises(ValueError, match="no .tar shards"):
        datasets.find_shards(tmp_path, "test")


def test_classifier_equals_open_clip_builder_with_callable_templates(clip_weights):
    from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    from pipeline.evaluation.zero_shot import build_zeroshot_head, render_prompts

    name, weights = clip_weights
    resolved = resolve(str(weights), name)
    templates = OPENAI_IMAGENET_TEMPLATES[:7]
    assert render_prompts("goldfish", templates)[0] == templates[0]("goldfish")
    assert render_prompts("goldfish", ["a {c}."]) == ["a goldfish."]
    ours = build_zeroshot_head(resolved.model, resolved.tokenizer, CLASSNAMES, templates, torch.device("cpu"),
                            prompts_per_forward=20)  # 2 classes per forward: batching must not matter
    theirs = build_zero_shot_classifier(resolved.model, resolved.tokenizer, CLASSNAMES, templates)
    assert ours.shape == (32, len(CLASSNAMES)) and torch.allclose(ours, theirs, atol=1e-5)
