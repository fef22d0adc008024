"""One shard reader for training and evaluation (pipeline.data.reader, stream.py, eval_batches.py): a bad
sample is counted under the same reason wherever it is read, and the evaluation stream scores every sample
exactly once across ranks. Shards are written with webdataset's TarWriter, not with our code."""
from __future__ import annotations

import collections
import dataclasses
import io

import pytest
import timm
import torch
from PIL import Image
from webdataset import TarWriter

from pipeline.config import DataSection
from pipeline.data import reasons
from pipeline.data.eval_batches import labelled_batches
from pipeline.data.labelled import eval_transform, labelled_loader
from pipeline.data.shards import resolve_shards
from pipeline.data.stream import EvalStream, eval_loader
from pipeline.evaluation.resolver import resolve
from pipeline.evaluation.tasks import EvalOptions, evaluate

NOT_A_JPEG = b"\xff\xd8\xff\xe0 these bytes start like a JPEG and are not one"


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (index * 17 % 256, 90, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_labelled(folder, per_shard: list[int], corrupt: set[int] = frozenset()) -> list[str]:
    """Shards of jpg + cls samples s0000, s0001, ... (the given counts per shard); sample i's image is bad
    bytes when i is in `corrupt`. Returns every key, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, number = [], 0
    for shard, count in enumerate(per_shard):
        with TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for _ in range(count):
                key = f"s{number:04d}"
                sink.write({"__key__": key, "jpg": NOT_A_JPEG if number in corrupt else jpeg(number),
                            "cls": str(number % 3).encode()})
                keys.append(key)
                number += 1
    return keys


def _training_skips(shards, data: DataSection, micro_batches: int) -> collections.Counter:
    skips = collections.Counter()
    batches = iter(labelled_loader(shards, data, 0, 1, seed=0, training=True, batch_size=2))
    for _ in range(micro_batches):
        item = next(batches)
        assert len(item.batch[1]) == 2  # topped up: full whatever was skipped
        skips.update(item.skips)
    return skips


@pytest.mark.parametrize("fast_decode", [False, True])
def test_a_corrupt_image_has_one_reason_in_training_validation_and_launch_eval(tmp_path, fast_decode):
    folder = tmp_path / "labelled"
    write_labelled(folder, [5, 4], corrupt={3})
    shards = resolve_shards(str(folder))
    data = DataSection(train=str(folder), image_size_px=16, num_workers_per_rank=0, fast_decode=fast_decode,
                       val_crop_pct=1.0)

    # training (the trainer's iterable, plain or fast decode): three epochs of 4 micro-batches of 2
    training = _training_skips(shards, data, micro_batches=12)
    assert set(training) == {reasons.CORRUPT_IMAGE} and training[reasons.CORRUPT_IMAGE] >= 1

    # validation during training
    validation = collections.Counter()
    for item in labelled_loader(shards, data, 0, 1, seed=0, training=False, batch_size=4):
        validation.update(item.skips)
    assert validation == {reasons.CORRUPT_IMAGE: 1}

    # launch eval's result file (classify on a timm net)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "net.pth")
    result = evaluate("classify", resolve(str(tmp_path / "net.pth"), "test_resnet"), folder,
                      EvalOptions(batch_size=4, num_workers=0, device="cpu"))
    assert result["metrics"]["num_skipped"] == {reasons.CORRUPT_IMAGE: 1}
    assert result["metrics"]["num_samples"] == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_on_two_ranks_reads_each_of_an_odd_count_once(tmp_path, workers):
    keys = write_labelled(tmp_path / "odd", [7, 6])  # 13 samples: no even split between 2 ranks
    shards = resolve_shards(str(tmp_path / "odd"))
    per_rank = []
    for rank in range(2):
        stream = EvalStream(shards, rank, 2, 4, lambda raw: raw["__key__"], collate=list)
        per_rank.append([key for item in eval_loader(stream, workers) for key in item.batch])
    # batches of 4 dealt in turn: rank 0 gets samples 0-3 and 8-11, rank 1 gets 4-7 and 12
    assert sorted(per_rank[0]) == keys[0:4] + keys[8:12] and sorted(per_rank[1]) == keys[4:8] + keys[12:13]
    assert sorted(per_rank[0] + per_rank[1]) == keys


def test_eval_batches_on_two_ranks_score_each_sample_once_and_count_each_skip_once(tmp_path):
    keys = write_labelled(tmp_path / "odd", [6, 5], corrupt={4, 5, 6, 7})  # rank 1's first batch: all bad
    shards = resolve_shards(str(tmp_path / "odd"))
    transform = eval_transform(DataSection(image_size_px=16, val_crop_pct=1.0))
    scored, skipped, empty = [], collections.Counter(), 0
    for rank in range(2):
        for item in labelled_batches(shards, transform, 4, 2, rank=rank, world_size=2):
            skipped.update(item.skips)
            if item.batch is None:
                empty += 1
                continue
            batch_keys = [key.split("/", 1)[1] for key in item.batch.keys]  # 'shard name/key'
            assert item.batch.labels.tolist() == [int(key[1:]) % 3 for key in batch_keys]
            scored += batch_keys
    assert sorted(scored) == [k for i, k in enumerate(keys) if i not in {4, 5, 6, 7}]
    assert skipped == {reasons.CORRUPT_IMAGE: 4} and empty == 1


def test_stream_batch_is_what_every_stream_yields(tmp_path):
    """Training and evaluation hand over the same small record (batch, skips, position)."""
    write_labelled(tmp_path / "d", [4])
    shards = resolve_shards(str(tmp_path / "d"))
    data = DataSection(train=str(tmp_path / "d"), image_size_px=16, num_workers_per_rank=0)
    train_item = next(iter(labelled_loader(shards, data, 0, 1, seed=0, training=True, batch_size=2)))
    eval_item = next(iter(labelled_loader(shards, data, 0, 1, seed=0, training=False, batch_size=2)))
    assert type(train_item) is type(eval_item)
    assert {f.name for f in dataclasses.fields(train_item)} == {"batch", "skips", "position"}
    assert train_item.position.offset == 2 and eval_item.position is None
