"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time"): the weights of several fine-tunes of one pretrained model,
averaged into one model that costs what one ingredient costs.

  uniform  the mean of every ingredient's weights.
  greedy   the paper's recipe: ingredients sorted by held-out accuracy, best first; each next one joins the soup
           (a uniform mean of the ones kept) only if held-out accuracy does not drop (>=, as the paper's code).
           The soup starts as the best ingredient, so it is never worse than it on the held-out set.

Held-out accuracy is what `launch eval` reports (pipeline.evaluation.tasks): top-1 of `classify` for
classifiers, of `zeroshot` (the set's class names x templates) for CLIP models; the first of these two
tasks the model's family can run.

BatchNorm: running statistics are averaged with the weights, as the paper's code does (it averages whole
state dicts). Fine-tunes of one pretrained model stay in one basin, where the mean of their statistics
describes the mean of their features well (the paper's BN-free CLIP ViTs aside, its ResNet ablations soup BN
models this way). Recomputing the statistics would need a pass over training data, which a soup of
checkpoints does not have; integer counters (num_batches_tracked) are taken from the best ingredient.

Ingredients must be compatible: one model family, one architecture, the same state keys and shapes and the same
class names; anything else is a one-line ValueError naming the ingredient. The soup is written as its family's
hub folder export (pipeline.evaluation.export; `launch export --format timm-dir` for classifiers) plus soup.json,
so `launch eval/export DIR`, distill.teacher: DIR and model.pretrained_path: DIR/<weights file> take it, and the
library loads DIR alone.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline import families, storage
from pipeline.class_names import model_class_names
from pipeline.evaluation.export import export
from pipeline.evaluation.resolver import ResolvedModel, resolve, state_dict_sha256
from pipeline.evaluation.tasks import EvalOptions, evaluate

SOUP_METHODS = ("uniform", "greedy")
SOUP_RECORD = "soup.json"
# The held-out measure, in order of preference: both score top-1 on a labelled set.
HELD_OUT_TASKS = ("classify", "zeroshot")
BATCHNORM_POLICY = ("averaged: running statistics are averaged with the weights, as the model soups paper's "
                    "code does for fine-tunes of one model; recomputing them would need training data")


@dataclass(frozen=True)
class Ingredient:
    ref: str
    resolved: ResolvedModel
    held_out_acc1: float


def held_out_task(resolved: ResolvedModel) -> str:
    """The evaluation task that measures a soup of this model's family; ValueError when there is none."""
    tasks = families.get(resolved.kind).eval_tasks
    task = next((t for t in HELD_OUT_TASKS if t in tasks), None)
    if task is None:
        raise ValueError(f"soup: {resolved.model_name} ({resolved.kind}) has no held-out accuracy "
                         f"(its family runs none of {', '.join(HELD_OUT_TASKS)})")
    return task


def check_compatible(refs: list[str], models: list[ResolvedModel]) -> None:
    """One family, one architecture, the same state keys, shapes and class names; ValueError naming the first
    ingredient that differs from the first one."""
    first, first_state = models[0], models[0].model.state_dict()
    first_names, _ = model_class_names(first.path, first.run_config)
    for ref, other in zip(refs[1:], models[1:]):
        state = other.model.state_dict()
        names, _ = model_class_names(other.path, other.run_config)
        shapes = [k for k in first_state if k in state and state[k].shape != first_state[k].shape]
        if other.kind != first.kind or other.model_name != first.model_name:
            reason = f"{other.kind} {other.model_name}, not {first.kind} {first.model_name}"
        elif set(state) != set(first_state):
            missing, extra = sorted(set(first_state) - set(state)), sorted(set(state) - set(first_state))
            reason = f"other state keys (missing {missing[:3]}, extra {extra[:3]})"
        elif shapes:
            reason = (f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, not "
                      f"{tuple(first_state[shapes[0]].shape)}")
        elif first_names and names and list(names) != list(first_names):
            reason = f"other class names ({len(names)} classes, not the same {len(first_names)})"
        else:
            continue
        raise ValueError(f"soup: {ref} cannot join a soup with {refs[0]}: {reason}")


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of floating-point tensors (fp32 sums, back in each tensor's dtype); other tensors (BatchNorm's
    num_batches_tracked) from the first state."""
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            total = sum(state[key].detach().float() for state in states)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value.detach().clone()
    return averaged


def souped(ingredients: list[Ingredient]) -> ResolvedModel:
    """The uniform soup of `ingredients` as a resolved model (the first ingredient's config and transform)."""
    base = ingredients[0].resolved
    model = copy.deepcopy(base.model)
    model.load_state_dict(average_states([i.resolved.model.state_dict() for i in ingredients]), strict=True)
    model.eval()
    return replace(base, model=model, step=None, source="soup", content_sha256=state_dict_sha256(model.state_dict()))


def held_out_acc1(resolved: ResolvedModel, data_dir: Path, options: EvalOptions) -> float:
    result = evaluate(held_out_task(resolved), resolved, data_dir, options)
    return float(result["metrics"]["acc1"])


def _greedy(ranked: list[Ingredient], data_dir: Path, options: EvalOptions) -> tuple[list[Ingredient], float]:
    kept, best_acc1 = [ranked[0]], ranked[0].held_out_acc1
    for candidate in ranked[1:]:
        acc1 = held_out_acc1(souped([*kept, candidate]), data_dir, options)
        if acc1 >= best_acc1:
            kept, best_acc1 = [*kept, candidate], acc1
    return kept, best_acc1


def make_soup(refs: list[str], method: str, data_dir: Path, options: EvalOptions) -> tuple[ResolvedModel, dict]:
    """(the soup, its record: method, held-out accuracies of the soup and of each ingredient, which were kept)."""
    if method not in SOUP_METHODS:
        raise ValueError(f"--method {method}: unknown soup method (valid: {', '.join(SOUP_METHODS)})")
    if len(refs) < 2:
        raise ValueError("--checkpoints: a soup needs at least two checkpoints")
    models = [resolve(ref) for ref in refs]
    check_compatible(refs, models)
    held_out_task(models[0])
    ingredients = [Ingredient(ref, m, held_out_acc1(m, data_dir, options)) for ref, m in zip(refs, models)]
    # Stable sort: equal accuracies keep the order given.
    ranked = sorted(ingredients, key=lambda i: i.held_out_acc1, reverse=True)
    if method == "greedy":
        kept, soup_acc1 = _greedy(ranked, data_dir, options)
        soup = souped(kept)
    else:
        kept = ranked
        soup = souped(kept)
        soup_acc1 = held_out_acc1(soup, data_dir, options)
    record = {
        "method": method,
        "held_out": str(data_dir),
        "held_out_task": held_out_task(soup),
        "held_out_acc1": soup_acc1,
        "best_ingredient_acc1": ranked[0].held_out_acc1,
        "batchnorm": BATCHNORM_POLICY,
        "model": soup.model_name,
        "content_sha256": soup.content_sha256,
        "ingredients": [{"ref": i.ref, "held_out_acc1": i.held_out_acc1, "step": i.resolved.step,
                         "content_sha256": i.resolved.content_sha256, "kept": any(i is k for k in kept)}
                        for i in ranked],
    }
    return soup, record


def check_output(output: str | Path) -> None:
    """--output, a local folder or a bucket URL, must be new or empty (checked before the soup is made, and
    again before writing)."""
    if storage.exists(output) and (not storage.is_dir(output) or storage.listdir(output)):
        raise ValueError(f"--output {output}: exists and is not an empty folder")


def write_soup(soup: ResolvedModel, record: dict, output: Path) -> list[Path]:
    """The soup as its family's hub folder export (safetensors with our metadata + the library's config) and
    soup.json, in `output`; returns the files written, the weights first."""
    output = Path(output)
    check_output(output)
    layout = families.get(soup.kind).hub_folder
    if layout is not None:
        files = export(soup, layout.format, output)
    else:  # a family without a hub layout: our own safetensors export
        files = export(soup, "safetensors", output / "model.safetensors")
    record = {**record, "files": [path.name for path in files]}
    (output / SOUP_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return [*files, output / SOUP_RECORD]
