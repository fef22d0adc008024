"""Exactly-once data, deterministic resume and surviving killed workers (real Ray, real DeepSpeed)."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from launch.prepare import write_run_record
from launch.pretrain import prepared_config, run_on_ray
from pipeline import checkpoint
from pipeline.data import reasons
from pipeline.data.shards import resolve_shards
from pipeline.data.stream import EvalStream, Position, ResumableStream

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")


# ------------------------------------------------------------------ the data stream alone


def key_of(raw: dict) -> str:
    return raw["__key__"]


def consume(shards, world: int, batch: int, workers: int, start: Position, stop_offset: int | None = None):
    """Per rank: the keys it consumed in epoch start.epoch, and the position after its last batch."""
    keys, last = {}, start
    for rank in range(world):
        stream = ResumableStream(shards, rank, world, batch, key_of, seed=3, shuffle_window=256, start=start,
                                 collate=list)
        keys[rank] = []
        for item in DataLoader(stream, batch_size=None, num_workers=workers):
            if item.position.epoch != start.epoch:
                break
            keys[rank].extend(item.batch)
            last = item.position
            if stop_offset is not None and item.position.offset >= stop_offset:
                break
    return keys, last


@pytest.fixture(scope="module")
def train_shards(digits_root):
    return resolve_shards(f"{digits_root}/labelled/train")


def test_uninterrupted_epoch_consumes_every_sample_once(train_shards):
    keys, _ = consume(train_shards, world=2, batch=16, workers=2, start=Position())
    everything = keys[0] + keys[1]
    assert len(keys[0]) == len(keys[1])  # equal steps per rank
    assert len(everything) == len(set(everything)) == 1437 - 1437 % 32  # the tail < one global batch
    assert collections.Counter(k[:6] for k in everything)  # keys are real sample keys


def test_killed_and_resumed_mid_epoch_loses_and_repeats_nothing(train_shards):
    first, stopped_at = consume(train_shards, world=2, batch=16, workers=2, start=Position(), stop_offset=320)
    rest, _ = consume(train_shards, world=2, batch=16, workers=1, start=stopped_at)
    uninterrupted, _ = consume(train_shards, world=2, batch=16, workers=2, start=Position())
    for rank in (0, 1):  # the very same samples, in the same order, on the same rank
        assert first[rank] + rest[rank] == uninterrupted[rank]


def test_resume_with_a_different_world_size_keeps_exactly_once(train_shards):
    first, stopped_at = consume(train_shards, world=2, batch=16, workers=2, start=Position(), stop_offset=320)
    rest, _ = consume(train_shards, world=4, batch=8, workers=2, start=stopped_at)
    consumed = [k for r in first.values() for k in r] + [k for r in rest.values() for k in r]
    assert len(consumed) == len(set(consumed))
    assert 1437 - len(consumed) < 32  # only the epoch tail shorter than one global batch is left


def test_evaluation_stream_reads_every_sample_once(digits_root):
    shards = resolve_shards(f"{digits_root}/labelled/val")
    seen = []
    for rank in range(3):
        stream = EvalStream(shards, rank, 3, 50, key_of, collate=list)
        seen += [k for item in DataLoader(stream, batch_size=None, num_workers=2) for k in item.batch]
    assert len(seen) == len(set(seen)) == 360


# ------------------------------------------------------------------ training runs on Ray


def overrides(out: Path, name: str, digits_root: Path, **extra) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": name, "run.log_every_steps": 8,
        "data.train": f"{digits_root}/labelled/train", "data.val": "",
        "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 1, "data.image_size_px": 16,
        "data.num_classes": 10, "model.name": "resnet_nano", "optim.lr": 0.1, "schedule.warmup_epochs": 0,
        "schedule.max_steps": 24, "checkpoint.every_steps": 8, "checkpoint.keep_last": 5,
        "deepspeed.zero_stage": 2, "ray.num_workers": 2, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def launch(args: list[str]) -> tuple[dict | None, Path]:
    cfg = prepared_config(SMOKE, args)
    write_run_record(cfg, SMOKE)
    return run_on_ray(cfg, address=None), cfg.run_dir


def final_weights(run_dir: Path, step: int = 24) -> dict[str, torch.Tensor]:
    state, _ = checkpoint.load_consolidated(run_dir / "checkpoints" / checkpoint.step_tag(step))
    return state


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def uninterrupted(ray_session, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    final, run_dir = launch(overrides(out, "uninterrupted", digits_root))
    assert final and final["step"] == 24
    return out, final_weights(run_dir)


def test_killed_worker_restarts_from_checkpoint_and_ends_identical(uninterrupted, digits_root):
    out, reference = uninterrupted
    final, run_dir = launch(overrides(out, "killed", digits_root, **{
        "ray.max_failures": 1, "run.inject_failure_at_step": 13}))
    assert final and final["step"] == 24
    assert (run_dir / ".injected_failure_13").exists()  # the rank really died once
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16, 24]  # step 8 logged before the failure; the restart logged 16 and 24
    assert max_abs_difference(final_weights(run_dir), reference) == 0.0  # bit-identical on CPU fp32


def test_kill_while_writing_checkpoint_keeps_previous_and_resumes_it(uninterrupted, digits_root):
    out, reference = uninterrupted
    final, run_dir = launch(overrides(out, "killed_in_save", digits_root, **{
        "run.inject_failure_at_step": 16, "run.inject_failure_in_checkpoint": True}))
    assert final is None  # max_failures 0: the run stops
    incomplete = run_dir / "checkpoints" / "step_00000016"
    assert incomplete.is_dir() and not (incomplete / checkpoint.META_FILE).exists()
    assert checkpoint.find_latest_complete(run_dir).name == "step_00000008"
    final, _ = launch(overrides(out, "killed_in_save", digits_root))  # relaunch: resumes from step 8
    assert final and final["step"] == 24
    assert (incomplete / checkpoint.META_FILE).exists()  # rewritten whole this time
    assert max_abs_difference(final_weights(run_dir), reference) == 0.0


# ------------------------------------------------------------------ retention


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = checkpoint.checkpoints_root(run_dir) / checkpoint.step_tag(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    return path


def test_retention_keeps_last_k_and_every_mth_and_never_the_only_complete(tmp_path):
    for step in (100, 200, 300, 400, 500):
        fake_checkpoint(tmp_path, step)
    partial = fake_checkpoint(tmp_path, 600, complete=False)
    checkpoint.apply_retention(tmp_path, keep_last=2, keep_every=200)
    assert [p.name for p in checkpoint.list_complete(tmp_path)] == ["step_00000200", "step_00000400", "step_00000500"]
    assert partial.is_dir()  # a checkpoint being written is not retention's to delete
    assert checkpoint.find_latest_complete(tmp_path).name == "step_00000500"
    checkpoint.apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert [p.name for p in checkpoint.list_complete(tmp_path)] == ["step_00000500"]


def test_corrupt_samples_are_skipped_and_counted_once(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    from pipeline.config import DataSection
    from pipeline.data.labelled import labelled_loader
    from pipeline.data.shards import Shard

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="JPEG")
        return buffer.getvalue()

    path = tmp_path / "000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(40):
            bad = i in (3, 18, 19, 20)  # 18-20 is a whole evaluation batch of rank 0: nothing decodable
            sink.write({"__key__": f"s{i:03d}", "jpg": b"\xff\xd8 not a jpeg" if bad else jpeg(),
                        "cls": b"nine" if i == 25 else b"1"})
    shards = [Shard(str(path), 40)]
    data = DataSection(train=str(path), image_size_px=16, num_workers_per_rank=2)
    skipped, samples = collections.Counter(), 0
    for rank in range(2):
        for item in labelled_loader(shards, data, rank, 2, 0, training=False, batch_size=3):
            skipped.update(item.skips)
            samples += len(item.batch[1]) if item.batch is not None else 0
    assert samples == 35
    assert skipped == {reasons.CORRUPT_IMAGE: 4, reasons.BAD_LABEL: 1}
    # training, the two ranks as threads exchanging their shortfalls as a process group would: every
    # micro-batch is topped up to 4 samples from spares at the epoch's end (pipeline/data/full_batches.py),
    # and each sample the first epoch read is trained on or counted once with its reason
    import threading

    from pipeline.data.full_batches import LocalExchange
    from pipeline.data.stream import EpochLayout

    exchange, runs = LocalExchange(2, timeout_seconds=60), [None, None]

    def train_epoch(rank: int) -> None:
        out = []
        for item in labelled_loader(shards, data, rank, 2, 0, training=True, batch_size=4,
                                    exchange=exchange.for_rank(rank)):
            if item.position.epoch:
                break
            out.append((len(item.batch[1]), item.skips, item.position))
        runs[rank] = out

    threads = [threading.Thread(target=train_epoch, args=(rank,)) for rank in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert all(size == 4 for run in runs for size, _, _ in run)
    last = runs[0][-1][2]
    layout = EpochLayout(shards, 0, 0, True, data.shuffle_buffer)
    read = [layout.locate(p)[1] for p in [*range(last.offset), *range(40 - last.spares, 40)]]
    expected = collections.Counter(reasons.BAD_LABEL if i == 25 else reasons.CORRUPT_IMAGE
                                   for i in read if i in (3, 18, 19, 20, 25))
    skipped = sum((skips for run in runs for _, skips, _ in run), collections.Counter())
    assert skipped == expected and sum(expected.values()) >= 3
    assert 4 * 2 * len(runs[0]) + sum(skipped.values()) == len(read)
