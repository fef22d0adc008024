"""Matryoshka embeddings for CLIP (contrastive.matryoshka_dims): the loss is open_clip's loss summed over
nested, renormalised prefixes of the embedding; `launch eval zeroshot|retrieval --embed-dim D` scores a prefix.
End to end: two tiny CLIPs trained on the digits, one with Matryoshka widths, one without, scored zero-shot
at truncated widths."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, ContrastiveSection, ModelSection, load_config
from pipeline.models.clip import build_clip
from pipeline.tasks.contrastive import ContrastiveTask
from pipeline.tasks.contrastive_loss import MatryoshkaLoss, build_contrastive_loss, contrastive_loss

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_clip.yaml")
DIMS, WEIGHTS = (8, 32), (0.5, 2.0)


def _model_and_batch(contrastive: ContrastiveSection):
    torch.manual_seed(0)
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-vit"), contrastive)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49407, (6, 32), generator=generator)
    texts[:, 0], texts[:, 12], texts[:, 13:] = 49406, 49407, 0  # start, end (pooled there), padding
    return model, images, texts


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_is_the_weighted_sum_of_open_clip_losses_on_renormalised_prefixes(loss):
    contrastive = ContrastiveSection(loss=loss, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
    model, images, texts = _model_and_batch(contrastive)
    loss_fn = build_contrastive_loss(contrastive, rank=0, world_size=1)
    assert isinstance(loss_fn, MatryoshkaLoss)
    outputs = model(images, texts)
    ours = contrastive_loss(loss_fn, outputs)
    # The reference: open_clip's own loss on prefixes of the UNnormalised embeddings, each renormalised,
    # with the one logit scale (and bias) the model has.
    plain = build_contrastive_loss(ContrastiveSection(loss=loss), rank=0, world_size=1)
    raw_image, raw_text = model.encode_image(images), model.encode_text(texts)
    scale, bias = outputs["logit_scale"], outputs.get("logit_bias")
    widths = ((64, 1.0), *zip(DIMS, WEIGHTS))
    per_width = {d: plain(F.normalize(raw_image[:, :d], dim=-1), F.normalize(raw_text[:, :d], dim=-1), scale, bias)
                 for d, _ in widths}
    reference = sum(weight * per_width[d] for d, weight in widths)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert {d: v.item() for d, v in loss_fn.last_losses.items()} == pytest.approx(
        {d: v.item() for d, v in per_width.items()}, rel=1e-5)
    # Same gradients too: slicing the normalised features equals slicing the raw ones (normalising is
    # scale-invariant), so the trained function is the Matryoshka objective.
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(ours, params, allow_unused=True, retain_graph=True)  # logit scale: shared graph
    expected = torch.autograd.grad(reference, params, allow_unused=True)
    errors = [((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
              for got, want in zip(grads, expected) if want is not None]
    assert len(errors) > 10 and max(errors) < 1e-4, max(errors)  # relative to each parameter's largest entry


def test_without_dims_the_loss_is_todays_open_clip_loss():
    contrastive = ContrastiveSection(loss="clip")
    model, images, texts = _model_and_batch(contrastive)
    loss_fn = build_contrastive_loss(contrastive, rank=0, world_size=1)
    assert not isinstance(loss_fn, MatryoshkaLoss)
    outputs = model(images, texts)
    reference = loss_fn(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
    assert contrastive_loss(loss_fn, outputs).item() == reference.item()


def test_a_width_not_below_the_model_embedding_is_a_config_error():
    cfg = load_config(SMOKE, ["contrastive.matryoshka_dims=[16, 64]"])  # clip-tiny-rn embeds in 64 dims
    with pytest.raises(ConfigError, match=r"contrastive\.matryoshka_dims: \[64\] not below clip-tiny-rn's "
                                          r"embedding width 64") as err:
        ContrastiveTask.check(cfg)
    assert "\n" not in str(err.value)


# --- end to end on the smoke CLIP ------------------------------------------------------------------------------

STEPS = 60
# Widths scored; the Matryoshka model trains on every one (64 is its full width).
WIDTHS = (32, 16, 8)
# A Matryoshka-trained prefix stays within this of its full width's zero-shot accuracy (seen at 60 steps:
# 0.90 at 64 dims, 0.02 / 0.06 / 0.08 lower at 32 / 16 / 8) ...
MARGIN = 0.15
# ... while the plain model loses clearly more at the smallest width (seen: 0.94 -> 0.61 at 8 dims).
EXTRA_DROP = 0.1


def _train(out: Path, digits: Path, name: str, *extra: str) -> Path:
    overrides = [
        f"run.output_dir={out}", f"run.name={name}", "run.log_every_steps=20",
        f"data.train={digits}/image_text/train", "data.val=", "eval.zeroshot=[]", "eval.every_steps=0",
        "eval.at_end=false", f"schedule.max_steps={STEPS}", "schedule.warmup_epochs=0.5",
        f"checkpoint.every_steps={STEPS}", "ray.num_workers=1", *extra,
    ]
    cmd = [sys.executable, "-m", "launch", "pretrain", "--no-ray", "--config", SMOKE]
    for override in overrides:
        cmd += ["--set", override]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out / name


@pytest.fixture(scope="module")
def runs(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("matryoshka")
    # The two runs go side by side (as test_soup's fine-tunes): each is one core's worth, most of it start-up.
    with ThreadPoolExecutor(2) as pool:
        runs = {"matryoshka": pool.submit(_train, out, digits_root, "matryoshka",
                                          f"contrastive.matryoshka_dims={list(WIDTHS)}"),
                "plain": pool.submit(_train, out, digits_root, "plain")}
        return {name: run.result() for name, run in runs.items()}


def _zero_shot(run_dir: Path, digits: Path, widths) -> dict:
    """Zero-shot metrics on the 360 held-out digits at each width (None: full), the model resolved once."""
    from pipeline.evaluation.resolver import resolve
    from pipeline.evaluation.tasks import EvalOptions, evaluate

    resolved = resolve(str(run_dir), None)
    return {width: evaluate("zeroshot", resolved, digits / "zeroshot",
                            EvalOptions(batch_size=128, num_workers=0, embed_dim=width))["metrics"]
            for width in widths}


@pytest.fixture(scope="module")
def scores(runs, digits_root) -> dict:
    return {"nested": _zero_shot(runs["matryoshka"], digits_root, (None, *WIDTHS)),
            "plain": _zero_shot(runs["plain"], digits_root, (None, WIDTHS[-1]))}


@pytest.mark.integration
def test_matryoshka_prefixes_keep_zero_shot_accuracy_and_plain_ones_do_not(scores):
    acc = {name: {width: metrics["acc1"] for width, metrics in by_width.items()} for name, by_width in scores.items()}
    print("zero-shot acc1 by width:", acc)
    nested = acc["nested"]
    assert scores["nested"][None]["embed_dim"] == 64 and scores["nested"][8]["embed_dim"] == 8
    assert scores["nested"][8]["num_samples"] == 360
    assert nested[None] > 0.5, acc  # it learned (chance: 0.1)
    for width in WIDTHS:
        assert nested[width] >= nested[None] - MARGIN, (width, acc)
    smallest = WIDTHS[-1]
    nested_drop, plain_drop = nested[None] - nested[smallest], acc["plain"][None] - acc["plain"][smallest]
    assert plain_drop > nested_drop + EXTRA_DROP, acc


@pytest.mark.integration
def test_each_width_loss_is_a_train_metric(runs):
    rows = [json.loads(line) for line in (runs["matryoshka"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    width_losses = [last[f"train/matryoshka/{w}/loss"] for w in (64, *WIDTHS)]
    assert last["train/loss"] == pytest.approx(sum(width_losses), rel=1e-4), last  # unit weights: their sum
    plain = [json.loads(line) for line in (runs["plain"] / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("train/matryoshka") for row in plain for key in row)


@pytest.mark.integration
def test_eval_cli_embed_dim_records_the_width_and_refuses_a_wider_one(runs, scores, digits_root, tmp_path, capsys):
    from launch.cli import main

    args = ["eval", "zeroshot", "--checkpoint", str(runs["matryoshka"]), "--data", str(digits_root / "zeroshot"),
            "--workers", "0", "--output", str(tmp_path / "r.json")]
    with redirect_stdout(io.StringIO()):
        assert main([*args, "--embed-dim", "8"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["metrics"]["embed_dim"] == 8 and result["metrics"]["acc1"] == scores["nested"][8]["acc1"]
    capsys.readouterr()
    assert main([*args, "--embed-dim", "65"]) == 2
    err = capsys.readouterr().err  # DeepSpeed's consolidation notes come first
    assert err.splitlines()[-1] == "error: --embed-dim 65: must be between 1 and clip-tiny-rn's embedding width 64"
    assert "Traceback" not in err, err


@pytest.mark.integration
def test_eval_plan_scores_each_width_as_the_cli_does(runs, scores, digits_root, tmp_path):
    from pipeline.evaluation.plan import load_plan, run_plan, summary_table

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"output_dir: {tmp_path / 'results'}\nworkers: 0\nbatch_size: 128\n"
                         f"checkpoints: [{runs['matryoshka']}]\n"
                         f"datasets: [{{path: {digits_root / 'zeroshot'}, tasks: [zeroshot]}}]\n"
                         f"embed_dims: [null, {WIDTHS[-1]}]\n")
    rows = list(run_plan(load_plan(plan_file)))
    assert [row["embed_dim"] for row in rows] == [None, WIDTHS[-1]]
    for row in rows:  # the same numbers as one evaluation per width, each in its own file
        assert row["value"] == scores["nested"][row["embed_dim"]]["acc1"]
        assert json.loads(Path(row["file"]).read_text())["metrics"]["embed_dim"] == (row["embed_dim"] or 64)
    assert len({row["file"] for row in rows}) == 2
    assert f"acc1 @ {WIDTHS[-1]} dims" in summary_table(rows)
