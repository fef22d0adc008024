"""Every rank's micro-batch stays full when samples are skipped (issue 11, section 3).

open_clip's ClipLoss gathers features across ranks and SigLIP exchanges them with neighbours: both need
the same micro-batch size on every rank (gloo aborts on 8 vs 7). A skipped sample (corrupt image, empty
caption) is replaced by a spare position taken from the end of the epoch (pipeline.data.full_batches),
so every position is still consumed once or skipped and counted, and a resumed run continues at the
exact next sample.
"""
from __future__ import annotations

import collections
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import reasons
from pipeline.data.reasons import SkipSample
from pipeline.data.shards import Shard, resolve_shards
from pipeline.data.stream import EpochLayout, Position, ResumableStream

REPO = Path(__file__).resolve().parent.parent
SMOKE_CLIP = str(REPO / "configs" / "smoke_clip.yaml")
CORRUPT = reasons.CORRUPT_IMAGE
EMPTY = reasons.EMPTY_CAPTION


def png(index: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(index: int) -> str:
    return f"a photo of thing number {index}"


def write_shards(folder: Path, num_shards: int, per_shard: int, bad: dict[tuple[int, int], str]) -> list[Shard]:
    """Image-text shards (png + txt); bad[(shard, index)] is CORRUPT or EMPTY."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(per_shard):
                number = shard * per_shard + index
                kind = bad.get((shard, index))
                sink.write({"__key__": f"s{number:05d}",
                            "png": b"\x89PNG not an image" if kind == CORRUPT else png(number),
                            "txt": b"   " if kind == EMPTY else caption(number).encode()})
        shards.append(Shard(str(path), per_shard))
    return shards


def shard_of(shards: list[Shard], layout: EpochLayout, position: int) -> tuple[int, int]:
    path, index = layout.locate(position)
    return [s.path for s in shards].index(path), index


# ------------------------------------------------------------------ the stream alone, ranks as threads


def key_or_skip(raw: dict) -> str:
    if raw["png"].startswith(b"\x89PNG not"):
        raise SkipSample(CORRUPT)
    if not raw["txt"].strip():
        raise SkipSample(EMPTY)
    return raw["__key__"]


def run_ranks(shards, world: int, batch: int, workers: int, start: Position = Position(),
              max_batches: int | None = None, seed: int = 5, window: int = 16) -> list[list[tuple]]:
    """Each rank's (keys, skipped, position) per micro-batch of epoch start.epoch, ranks run as threads
    exchanging their shortfalls through a barrier, as the ranks of a process group would."""
    from pipeline.data.full_batches import LocalExchange, training_batches

    exchange = LocalExchange(world, timeout_seconds=60)
    results: list = [None] * world
    errors: list = []

    def rank_loop(rank: int) -> None:
        try:
            stream = ResumableStream(shards, rank, world, batch, key_or_skip, seed=seed, shuffle_window=window,
                                     start=start, collate=list)
            out = []
            for item in training_batches(stream, workers, exchange.for_rank(rank)):
                if item.position.epoch != start.epoch or (max_batches is not None and len(out) == max_batches):
                    break
                out.append((item.batch, item.skips, item.position))
            results[rank] = out
        except Exception as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)
            exchange.abort()

    threads = [threading.Thread(target=rank_loop, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def skippy_shards(tmp_path_factory):
    """3 shards of 50; 30 of the 150 samples are corrupt or captionless, in runs as well as alone."""
    rng = np.random.default_rng(11)
    chosen = rng.choice(150, size=24, replace=False).tolist() + [60, 61, 62, 63, 64, 65]  # a run of six
    bad = {divmod(n, 50): (CORRUPT if n % 2 else EMPTY) for n in set(chosen)}
    return write_shards(tmp_path_factory.mktemp("skippy"), 3, 50, bad), bad


def planted(bad: dict, keys) -> collections.Counter:
    return collections.Counter(bad[divmod(int(k[1:]), 50)] for k in keys if divmod(int(k[1:]), 50) in bad)


def layout_keys(shards, positions, epoch: int = 0, seed: int = 5, window: int = 16) -> list[str]:
    layout = EpochLayout(shards, seed, epoch, True, window)
    keys = []
    for position in positions:
        shard, index = shard_of(shards, layout, position)
        keys.append(f"s{shard * 50 + index:05d}")
    return keys


@pytest.mark.parametrize("world,batch,workers", [(2, 8, 2), (3, 5, 0)])
def test_every_micro_batch_is_full_and_every_position_used_once(skippy_shards, world, batch, workers):
    shards, bad = skippy_shards
    ranks = run_ranks(shards, world, batch, workers)
    steps = len(ranks[0])
    assert steps >= 3 and all(len(r) == steps for r in ranks)
    for rank in ranks:
        assert all(len(keys) == batch for keys, _, _ in rank)  # full, whatever was skipped
    consumed = [k for rank in ranks for keys, _, _ in rank for k in keys]
    assert len(consumed) == len(set(consumed)) == steps * world * batch
    assert not planted(bad, consumed)  # no skipped sample was trained on
    # positions [0, offset) were dealt, the last `spares` of the epoch topped batches up; what lies
    # between is the epoch's tail, never read: less than one global micro-batch plus the spares the
    # last one would have needed
    last = ranks[0][-1][2]
    assert all(r[-1][2] == last for r in ranks)
    read = layout_keys(shards, [*range(last.offset), *range(150 - last.spares, 150)])
    assert 150 - len(read) < 2 * world * batch
    skipped = sum((s for rank in ranks for _, s, _ in rank), collections.Counter())
    assert set(consumed) <= set(read) and len(consumed) + sum(skipped.values()) == len(read)
    assert skipped == planted(bad, read)  # each read position: trained on, or skipped and counted once


def test_resume_mid_epoch_continues_at_the_exact_next_sample(skippy_shards):
    shards, bad = skippy_shards
    whole = run_ranks(shards, 2, 8, 2)
    first = run_ranks(shards, 2, 8, 2, max_batches=3)
    stopped = first[0][2][2]
    assert stopped.spares > 0  # the first three micro-batches needed spares (the test means something)
    rest = run_ranks(shards, 2, 8, 1, start=stopped)
    for rank in range(2):
        assert [k for keys, _, _ in first[rank] + rest[rank] for k in keys] == \
            [k for keys, _, _ in whole[rank] for k in keys]
        assert [p for _, _, p in first[rank] + rest[rank]] == [p for _, _, p in whole[rank]]


def test_resume_with_another_world_size_keeps_exactly_once(skippy_shards):
    shards, bad = skippy_shards
    first = run_ranks(shards, 2, 8, 2, max_batches=3)
    rest = run_ranks(shards, 3, 4, 1, start=first[0][2][2])
    consumed = [k for part in (first, rest) for rank in part for keys, _, _ in rank for k in keys]
    assert len(consumed) == len(set(consumed)) and not planted(bad, consumed)
    assert all(len(keys) == 4 for rank in rest for keys, _, _ in rank)


# ------------------------------------------------------------------ a real 2-rank CLIP run on Ray


def test_two_rank_clip_run_with_skips_in_one_rank_stays_full_and_exact(ray_session, tmp_path):
    """Corrupt images and an empty caption in rank 1's slice of the first micro-batch (and a corrupt
    spare), an empty caption in rank 0's slice of the second: the run finishes, the skips are counted
    exactly, and step 1's loss is open_clip's single-process ClipLoss on the 16 samples it used."""
    from launch.prepare import write_run_record
    from launch.pretrain import prepared_config, run_on_ray

    per_rank, num_shards, per_shard, seed, window = 8, 2, 40, 0, 16
    probe = [Shard(str(tmp_path / "data" / f"{s:05d}.tar"), per_shard) for s in range(num_shards)]
    layout = EpochLayout(probe, seed, 0, True, window)
    total = num_shards * per_shard
    bad_positions = {9: CORRUPT, 12: EMPTY, 14: CORRUPT,  # rank 1's slice of micro-batch 0 (positions 8-15)
                     total - 1: CORRUPT,  # the first spare: rank 1 needs a second round
                     16 + 2: EMPTY}  # rank 0's slice of micro-batch 1 (positions 16-23)
    bad = {shard_of(probe, layout, p): kind for p, kind in bad_positions.items()}
    shards = write_shards(tmp_path / "data", num_shards, per_shard, bad)
    assert [s.path for s in shards] == [s.path for s in probe]

    overrides = {
        "run.output_dir": str(tmp_path / "runs"), "run.name": "full_batches", "run.seed": seed,
        "run.log_every_steps": 1, "data.train": str(tmp_path / "data"), "data.val": "",
        "eval.zeroshot": "[]", "eval.at_end": False, "eval.every_steps": 0,
        "data.batch_size_per_rank": per_rank, "data.num_workers_per_rank": 1, "data.image_size_px": 32,
        "data.rrc_scale_min": 1.0, "data.hflip_prob": 0.0, "data.shuffle_buffer": window,
        "model.name": "clip-tiny-vit", "schedule.max_steps": 3, "schedule.warmup_epochs": 0,
        "checkpoint.every_steps": 0, "ray.num_workers": 2,
    }
    cfg = prepared_config(SMOKE_CLIP, [f"{k}={v}" for k, v in overrides.items()])
    write_run_record(cfg, SMOKE_CLIP)
    final = run_on_ray(cfg, address=None)
    assert final, "training failed"
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == [1, 2, 3]
    assert train[1]["train/skipped_samples"] == {CORRUPT: 3, EMPTY: 1}
    assert train[2]["train/skipped_samples"] == {EMPTY: 1}
    assert "train/skipped_samples" not in train[3]

    # Step 1 used positions 0-15 less the three bad ones, then spares from the end of the epoch:
    # total-1 (corrupt), total-2, total-3, then total-4 in the second round.
    used = [p for p in range(16) if p not in bad_positions] + [total - 2, total - 3, total - 4]
    numbers = [shard * per_shard + index for shard, index in (shard_of(shards, layout, p) for p in used)]
    assert len(numbers) == 16
    expected = single_process_clip_loss(cfg, numbers)
    assert train[1]["train/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def single_process_clip_loss(cfg, numbers: list[int]) -> float:
    """open_clip's ClipLoss, one process, on the given samples, with the run's initial weights."""
    import open_clip

    from pipeline.models.clip import build_clip, get_tokenizer

    torch.manual_seed(cfg.run.seed)  # what every rank does before building the model
    model = build_clip(cfg.model, cfg.contrastive)
    model.train()
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(png(n))))) for n in numbers])
    mean, std = torch.tensor(cfg.data.mean), torch.tensor(cfg.data.std)
    images = ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()
    texts = get_tokenizer(cfg.model.name)([caption(n) for n in numbers])
    with torch.no_grad():
        out = model(images, texts)
        loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    return float(loss)
