"""End to end on a real local Ray cluster with real DeepSpeed (gloo): train, checkpoint, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.prepare import write_run_record
from launch.pretrain import prepared_config, run_on_ray
from pipeline import checkpoint
from pipeline.data import reasons

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")


def tiny_run_overrides(out: Path, digits_root: Path, train: str, **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": "tiny", "run.log_every_steps": 8,
        "data.train": train, "data.val": f"{digits_root}/labelled/val",
        "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 2, "data.image_size_px": 16,
        "model.name": "resnet_nano", "optim.lr": 0.2, "schedule.warmup_epochs": 0,
        "schedule.max_steps": 48, "checkpoint.every_steps": 24, "deepspeed.zero_stage": 2,
        "ray.num_workers": 2, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def launch(overrides: list[str]) -> tuple[dict, Path]:
    cfg = prepared_config(SMOKE, overrides)
    write_run_record(cfg, SMOKE)
    final = run_on_ray(cfg, address=None)
    assert final, "training failed"
    return final, cfg.run_dir


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(ray_session, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    final, run_dir = launch(tiny_run_overrides(out, digits_root, f"{digits_root}/labelled/train",
                                               **{"optim.ema_decay": 0.9}))
    return out, final, run_dir


def test_two_worker_zero2_run_learns_and_writes_its_record(first_run):
    _, final, run_dir = first_run
    rows = metrics_rows(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [8, 16, 24, 32, 40, 48]
    losses = [r["train/loss"] for r in train_rows]
    assert losses[-1] < losses[0] - 0.3, losses
    assert final["step"] == 48 and final["val/samples"] == 360  # every held-out sample, once
    assert final["val/top1"] > 0.3  # a fraction; 10 classes: chance is 0.1
    assert final["val/ema/samples"] == 360 and 0 <= final["val/ema/top1"] <= 1  # the EMA weights, validated
    assert all(r["train/samples_per_second"] > 0 and 0 <= r["train/data_wait_fraction"] <= 1 for r in train_rows)
    config_text = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 2" in config_text and "resnet_nano" in config_text
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["deepspeed"] and versions["ray"] and "revision" in versions["git"]
    assert list((run_dir / "tensorboard").iterdir())
    steps = [p.name for p in checkpoint.list_complete(run_dir)]
    assert steps == ["step_00000024", "step_00000048"]
    meta = checkpoint.read_meta(run_dir / "checkpoints" / "step_00000048")
    assert meta["config"]["model"]["name"] == "resnet_nano" and meta["world_size"] == 2
    # ZeRO-2 with 2 ranks: one optimizer shard per rank
    assert len(list((run_dir / "checkpoints" / "step_00000048").glob("*optim_states.pt"))) == 2


def test_relaunch_resumes_at_next_step(first_run, digits_root):
    out, _, run_dir = first_run
    before = len(metrics_rows(run_dir))
    final, _ = launch(tiny_run_overrides(out, digits_root, f"{digits_root}/labelled/train",
                                         **{"schedule.max_steps": 64, "optim.ema_decay": 0.9}))
    new_rows = [r for r in metrics_rows(run_dir)[before:] if "train/loss" in r]
    # (the relaunch keeps optim.ema_decay: the EMA weights come back from the checkpoint too)
    assert [r["step"] for r in new_rows] == [56, 64]  # continued from 48, not from 0
    assert final["step"] == 64
    # the resumed model kept what it learned: its loss starts near where the first run ended
    assert new_rows[0]["train/loss"] < metrics_rows(run_dir)[0]["train/loss"]


def corrupted_copy(shard: str, out: Path, corrupt: set[int]) -> Path:
    """The shard rewritten with the images of the given sample indices replaced by garbage."""
    import webdataset as wds

    from shard_helpers import shard_samples

    out.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out)) as sink:
        for index, raw in enumerate(shard_samples(shard)):
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            if index in corrupt:
                sample["jpg"] = b"\xff\xd8 truncated"
            sink.write(sample)
    return out


def test_fewer_shards_than_readers_does_not_starve_a_rank(ray_session, digits_root, tmp_path):
    # one shard, 2 ranks x 2 loader workers = 4 readers: every reader still gets samples
    corrupt = set(range(0, 200, 9))
    shard = corrupted_copy(f"{digits_root}/labelled/train/00000.tar", tmp_path / "one" / "000.tar", corrupt)
    final, run_dir = launch(tiny_run_overrides(tmp_path, digits_root, str(shard),
                                               **{"schedule.max_steps": 16, "checkpoint.every_steps": 0,
                                                  "data.num_classes": 10}))
    assert final["step"] == 16
    rows = [r for r in metrics_rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [8, 16]
    # every corrupt sample a step read, on either rank, is counted once with its reason; micro-batches are
    # topped up from spares at the end of each epoch (pipeline/data/full_batches.py), replayed here
    from pipeline.data.shards import Shard
    from pipeline.data.stream import EpochLayout

    layouts = lambda epoch: EpochLayout([Shard(str(shard), 200)], 0, epoch, True, 500)  # noqa: E731
    expected = expected_skips(layouts, corrupt, micro_batches=16, world=2, batch=16)
    counted = sum(sum(r.get("train/skipped_samples", {}).values()) for r in rows)
    assert expected > 0 and counted == expected
    assert {reason for r in rows for reason in r.get("train/skipped_samples", {})} == {reasons.CORRUPT_IMAGE}


def expected_skips(layouts, bad: set[int], micro_batches: int, world: int, batch: int) -> int:
    """Skips counted in the first `micro_batches` global micro-batches: each rank's slice of [offset,
    offset + G), then spares num_samples-1, -2, ... dealt in rank order until every slice is full; an epoch
    ends when a micro-batch would reach into the used spares or its shortfall cannot be covered."""
    counted, epoch, global_batch = 0, 0, world * batch
    while micro_batches:
        layout = layouts(epoch)
        size, offset, spares = layout.num_samples, 0, 0
        is_bad = lambda position: layout.locate(position)[1] in bad  # noqa: E731
        while micro_batches and offset + global_batch <= size - spares:
            short = [sum(map(is_bad, range(offset + r * batch, offset + (r + 1) * batch))) for r in range(world)]
            skipped, used = sum(short), spares
            while sum(short) and offset + global_batch <= size - used - sum(short):
                dealt = [used + sum(short[:r]) for r in range(world)]
                short, used = [sum(is_bad(size - 1 - j) for j in range(d, d + n)) for d, n in zip(dealt, short)], \
                    used + sum(short)
                skipped += sum(short)
            if sum(short):
                break  # not enough spares left: the rest of the epoch is its tail
            counted, spares, offset, micro_batches = counted + skipped, used, offset + global_batch, micro_batches - 1
        epoch += 1
    return counted


def test_zero2_two_worker_checkpoint_resolves_and_scores_like_validation(first_run, digits_root):
    from pipeline.evaluation.resolver import resolve
    from pipeline.evaluation.tasks import EvalOptions, evaluate

    _, _, run_dir = first_run
    final = json.loads((run_dir / "final_metrics.json").read_text())  # the last run's validation
    resolved = resolve(str(run_dir))  # ZeRO-2 shards of 2 ranks, consolidated to fp32
    assert resolved.kind == "classifier" and resolved.step == final["step"] and resolved.source == "run_dir"
    result = evaluate("classify", resolved, Path(f"{digits_root}/labelled/val"),
                      EvalOptions(split="test", batch_size=64, num_workers=0, device="cpu", amp=False))
    # the same weights, images and transform as the trainer's validation: at most a near-tie apart
    assert abs(result["metrics"]["acc1"] - final["val/top1"]) <= 1 / 360 + 1e-9
    assert result["checkpoint_step"] == final["step"]


def test_validation_top1_is_the_fraction_the_saved_model_gets_right(first_run, digits_root):
    """val/top1 and val/top5 against a count made here: every held-out sample read with tarfile and PIL,
    scored one at a time by the checkpoint's weights (no stream, no top-k helper of the pipeline)."""
    import io
    import tarfile

    import torch
    from PIL import Image

    from pipeline.evaluation.resolver import resolve

    _, _, run_dir = first_run
    final = json.loads((run_dir / "final_metrics.json").read_text())  # the latest run's validation
    resolved = resolve(str(run_dir))
    assert resolved.step == final["step"]
    model = resolved.model.eval()
    total = top1 = top5 = 0
    for shard in sorted(Path(f"{digits_root}/labelled/val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                label = int(tar.extractfile(members[name[:-len("jpg")] + "cls"]).read())
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                with torch.no_grad():
                    logits = model(resolved.preprocess(image)[None])[0]
                ranking = sorted(range(len(logits)), key=lambda c: -float(logits[c]))
                total, top1 = total + 1, top1 + (ranking[0] == label)
                top5 += label in ranking[:5]
    assert total == final["val/samples"] == 360
    assert 0 <= final["val/top1"] <= 1 and 0 <= final["val/top5"] <= 1
    # the same weights and transform: equal up to a near-tie flipped by batched float arithmetic
    assert abs(final["val/top1"] - top1 / total) <= 1 / total + 1e-9, (final["val/top1"], top1, total)
    assert abs(final["val/top5"] - top5 / total) <= 1 / total + 1e-9, (final["val/top5"], top5, total)


def test_tensorboard_holds_the_metrics_jsonl_keys(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, run_dir = first_run
    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_second", "val/top1", "val/top5", "val/samples",
            "val/ema/top1", "epoch"} <= tags, tags
    logged = {key for row in metrics_rows(run_dir) for key, value in row.items()
              if isinstance(value, (int, float)) and key != "step"}
    assert tags == logged and not any(tag.startswith("train/val") for tag in tags)
