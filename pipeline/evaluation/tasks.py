"""The four evaluation tasks behind one signature: (resolved model, data folder, options) -> result.
Which models a task can score is each model family's word (pipeline.families, `eval_tasks`).

A result is one JSON-ready dict per (checkpoint, dataset, task) with CLIP_benchmark's keys
(dataset, model, pretrained, task, metrics, language) plus where the numbers came from: the
checkpoint's step and weights hash, and the dataset manifest's hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from pipeline import families, storage
from pipeline.class_names import LabelMap, map_by_name, model_class_names
from pipeline.data.eval_batches import captioned_batches, labelled_batches
from pipeline.evaluation import datasets
from pipeline.evaluation.classify import evaluate_classifier
from pipeline.evaluation.linear_probe import evaluate_linear_probe
from pipeline.evaluation.metrics import json_safe
from pipeline.evaluation.resolver import ResolvedModel
from pipeline.evaluation.retrieval import evaluate_retrieval
from pipeline.evaluation.runtime import cpu_forward_threads, default_device
from pipeline.evaluation.uint8_input import model_input_batches, split_uint8
from pipeline.evaluation.zero_shot import DEFAULT_CLASSNAMES, DEFAULT_TEMPLATES, evaluate_zero_shot
from pipeline.sample_counts import sample_shortfall


@dataclass(frozen=True)
class EvalOptions:
    split: str = "test"
    """Split folder to score (DIR/<split>/*.tar); flat folders of shards have no split."""
    train_split: str = "train"
    """Split the linear probe fits on."""
    batch_size: int = 64
    num_workers: int = 2
    """DataLoader worker processes; batches are dealt to them in turn (pipeline.data.stream.EvalStream)."""
    device: str | None = None
    """'cpu', 'cuda', ...; None = the GPU when there is one."""
    amp: bool = False
    """bf16 autocast (GPU); fp32 otherwise."""
    probe_method: str = "logistic_regression"
    """Linear-probe method (pipeline.evaluation.linear_probe.PROBE_METHODS): 'logistic_regression' or
    'clip_benchmark'."""
    strict: bool = False
    """A scored sample count that differs from the manifest's is an error instead of a warning."""
    embed_dim: int | None = None
    """zeroshot / retrieval: score the first N dims of each embedding, renormalised (a Matryoshka-trained
    model's nested widths, contrastive.matryoshka_dims); None = the model's full width."""
    channels_last: bool = True
    """Image batches in channels_last (NHWC) memory, weights unchanged (timm's --channels-last, as training's
    inputs): oneDNN and cuDNN convolutions skip a layout reorder (forward CPU -25% for the smoke CLIP's
    ResNet tower, -5% for RN50; ViTs bit-identical). Same pixel values; a convolutional tower's logits can
    differ from an NCHW forward by float rounding (~1e-8), so False is for bitwise comparisons."""


def _device(options: EvalOptions) -> torch.device:
    return torch.device(options.device) if options.device else default_device()


def _read(read_batches: Callable, shards: list, resolved: ResolvedModel, options: EvalOptions):
    """read_batches(shards, transform, batch size, workers) with the model's transform split at its ToTensor
    where it can be (pipeline.evaluation.uint8_input): uint8 through the loader, normalised on the device,
    bit-identical input values to the model, in options.channels_last's memory order."""
    uint8 = split_uint8(resolved.preprocess)
    transform = uint8.to_uint8 if uint8 else resolved.preprocess
    batches = read_batches(shards, transform, options.batch_size, options.num_workers)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    return model_input_batches(batches, uint8, _device(options), memory_format)


def _labelled(data_dir: Path, split: str, resolved: ResolvedModel, options: EvalOptions,
              labels: LabelMap = LabelMap()):
    batches = _read(labelled_batches, datasets.split_shards(data_dir, split), resolved, options)
    if labels.targets is None:
        return batches
    return (replace(item, batch=replace(item.batch, labels=labels.apply(item.batch.labels)))
            if item.batch is not None else item for item in batches)


def _model_label_map(resolved: ResolvedModel, data_dir: Path, split: str) -> tuple[LabelMap, str]:
    """The data's labels as the classifier's outputs, compared by class name (pipeline.class_names), and
    what the result records about it."""
    data_names = datasets.read_classnames(data_dir, split)
    model_names, where = model_class_names(resolved.path, resolved.run_config)
    if not model_names or not data_names:
        missing = "the model records no class names" if not model_names else "the data lists no class names"
        return LabelMap(), f"unchecked ({missing}): labels used as output indices"
    labels = map_by_name(data_names, model_names, str(data_dir), f"the model ({where})")
    return labels, labels.note or "identity (same class names, same order)"


def dataset_zero_shot_prompts(data_dir: Path, split: str) -> tuple[list, list, dict]:
    """Class names and templates: the dataset's own files, else ImageNet's and OpenAI's 80 prompts."""
    classnames = datasets.read_classnames(data_dir, split)
    templates = datasets.read_templates(data_dir)
    sources = {"classnames": "dataset" if classnames else "imagenet",
               "templates": "dataset" if templates else "openai_imagenet"}
    classnames = classnames or list(DEFAULT_CLASSNAMES["imagenet"])
    templates = templates or list(DEFAULT_TEMPLATES["openai_imagenet"])
    return classnames, templates, {**sources, "num_classes": len(classnames), "num_templates": len(templates)}


def run_zeroshot(resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> dict:
    classnames, templates, prompt_info = dataset_zero_shot_prompts(data_dir, options.split)
    batches = _labelled(data_dir, options.split, resolved, options)
    metrics = evaluate_zero_shot(resolved.model.to(_device(options)), resolved.tokenizer, batches, classnames,
                                 templates, _device(options), datasets.listed_num_samples(data_dir, options.split),
                                 options.amp, options.embed_dim)
    return {**metrics, **prompt_info}


def run_retrieval(resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> dict:
    batches = _read(captioned_batches, datasets.split_shards(data_dir, options.split), resolved, options)
    return evaluate_retrieval(resolved.model.to(_device(options)), resolved.tokenizer, batches, _device(options),
                              total=datasets.listed_num_samples(data_dir, options.split), amp=options.amp,
                              embed_dim=options.embed_dim)


def run_linear_probe(resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> dict:
    for split in (options.train_split, options.split):
        if not datasets.has_split(data_dir, split):
            raise ValueError(f"eval linear-probe: {data_dir} needs {split}/*.tar (train and test split folders)")
    # The probe learns the train split's labels: the test split's must mean the same classes.
    labels = map_by_name(datasets.read_classnames(data_dir, options.split),
                         datasets.read_classnames(data_dir, options.train_split),
                         f"{data_dir} split {options.split}", f"split {options.train_split}")
    train = _labelled(data_dir, options.train_split, resolved, options)
    test = _labelled(data_dir, options.split, resolved, options, labels)
    metrics = evaluate_linear_probe(resolved.model.to(_device(options)), resolved.kind, train, test,
                                    _device(options), method=options.probe_method, batch_size=options.batch_size,
                                    amp=options.amp)
    return {**metrics, "label_mapping": labels.note or "identity"}


def run_classify(resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> dict:
    labels, mapping = _model_label_map(resolved, data_dir, options.split)
    batches = _labelled(data_dir, options.split, resolved, options, labels)
    metrics = evaluate_classifier(resolved.model.to(_device(options)), batches, _device(options),
                                  datasets.listed_num_samples(data_dir, options.split), options.amp)
    return {**metrics, "label_mapping": mapping}


@dataclass(frozen=True)
class EvalTask:
    """One `launch eval` task (the training loop's tasks are pipeline.tasks)."""

    benchmark_name: str
    """The `task` value CLIP_benchmark writes for the same evaluation."""
    run: Callable[[ResolvedModel, Path, EvalOptions], dict]
    headline_metric: str
    """The metric summary tables show."""


EVAL_TASKS: dict[str, EvalTask] = {
    "zeroshot": EvalTask("zeroshot_classification", run_zeroshot, "acc1"),
    "retrieval": EvalTask("zeroshot_retrieval", run_retrieval, "image_retrieval_recall@5"),
    "linear-probe": EvalTask("linear_probe", run_linear_probe, "acc1"),
    "classify": EvalTask("classification", run_classify, "acc1"),
}


def can_run(task: str, resolved: ResolvedModel) -> bool:
    return task in families.get(resolved.kind).eval_tasks


def needed_kinds(task: str) -> str:
    """The model kinds `task` can score, for messages: 'clip or classifier'."""
    return " or ".join(f.name for f in families.all_families() if task in f.eval_tasks) or "no"


def evaluate(task: str, resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> dict:
    """Run one task and return its result record."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown evaluation task {task!r} (valid: {', '.join(EVAL_TASKS)})")
    if not can_run(task, resolved):
        raise ValueError(f"eval {task}: needs a {needed_kinds(task)} model, "
                         f"but {resolved.model_name} is a {resolved.kind}")
    check_embed_dim(task, resolved, options.embed_dim)
    data_dir = Path(data_dir)
    with cpu_forward_threads(_device(options), options.num_workers):
        metrics = EVAL_TASKS[task].run(resolved, data_dir, options)
    warnings = _count_warnings(task, data_dir, options.split, metrics)
    if warnings and options.strict:
        raise ValueError(f"{warnings[0]} (--strict)")
    return {
        "dataset": data_dir.resolve().name,
        "model": resolved.model_name,
        "pretrained": str(resolved.path),
        "task": EVAL_TASKS[task].benchmark_name,
        "metrics": {k: json_safe(v) if isinstance(v, float) else v for k, v in metrics.items()},
        "language": "en",
        "checkpoint_source": resolved.source,
        "checkpoint_step": resolved.step,
        "checkpoint_sha256": resolved.content_sha256,
        "dataset_path": str(data_dir),
        "split": options.split if datasets.has_split(data_dir, options.split) else None,  # None: flat folder
        "manifest_sha256": datasets.manifest_sha256(data_dir, options.split),
        "warnings": warnings,
    }


EMBED_DIM_TASKS = ("zeroshot", "retrieval")


def check_embed_dim(task: str, resolved: ResolvedModel, embed_dim: int | None) -> None:
    """--embed-dim fits the task and the model: one line before any data is read."""
    if embed_dim is None:
        return
    if task not in EMBED_DIM_TASKS:
        raise ValueError(f"--embed-dim: applies to eval {' and '.join(EMBED_DIM_TASKS)}, not {task}")
    width = (resolved.model_config or {}).get("embed_dim")
    if embed_dim < 1 or (width is not None and embed_dim > width):
        raise ValueError(f"--embed-dim {embed_dim}: must be between 1 and {resolved.model_name}'s embedding "
                         f"width {width if width is not None else '(unknown)'}")


def _count_warnings(task: str, data_dir: Path, split: str, metrics: dict) -> list[str]:
    """The scored count (metrics' num_samples) against the manifest's: a shortfall is never silent."""
    path = datasets.manifest_path(data_dir, split)
    warning = sample_shortfall(f"eval {task}", int(metrics.get("num_samples") or 0),
                               datasets.listed_num_samples(data_dir, split), metrics.get("num_skipped"), str(path))
    return [warning] if warning else []


def write_result(result: dict, path: str | Path) -> None:
    """The result as JSON at `path`, a local file or a bucket URL (e.g. RUN_URL/eval/NAME.json, which
    `launch report` reads)."""
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    if storage.is_remote(path):
        storage.write_text(path, text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
