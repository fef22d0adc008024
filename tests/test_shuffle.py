"""Batches see the whole dataset, whatever order it was written in (issue 11, section 1).

A 100-class tree of small images written in class order, sharded (a) by data-prep and (b) by
webdataset's TarWriter in class order: the training streams of 2 ranks, built as the trainer builds
them, give global batches of 256 with at least 90% of the distinct classes uniform random draws give.
"""
from __future__ import annotations

import io
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import DataSection
from pipeline.data.shards import resolve_shards

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES, PER_CLASS, WORLD, PER_RANK = 100, 20, 2, 128
TOTAL, GLOBAL_BATCH = NUM_CLASSES * PER_CLASS, WORLD * PER_RANK


def png(label: int, index: int) -> bytes:
    pixels = np.full((16, 16, 3), (label * 2, index * 10, 128), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for label in range(NUM_CLASSES):
        folder = root / f"class_{label:03d}"
        folder.mkdir()
        for index in range(PER_CLASS):
            (folder / f"img_{index:02d}.png").write_bytes(png(label, index))
    return root


@pytest.fixture(scope="module")
def data_prep_shards(class_tree, tmp_path_factory) -> Path:
    """data-prep labelled with its defaults (and 200 rows per shard)."""
    from data_prep.cli import main

    out = tmp_path_factory.mktemp("prepped") / "train"
    assert main(["labelled", "--input", str(class_tree), "--output", str(out), "--image-size", "16",
                 "--shard-size", "200", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tarwriter_shards(class_tree, tmp_path_factory) -> Path:
    """Another tool's shards: class by class, 200 samples per tar, no manifest."""
    out = tmp_path_factory.mktemp("tarwriter")
    paths = sorted(class_tree.rglob("*.png"))
    for shard in range(0, TOTAL, 200):
        with wds.TarWriter(str(out / f"{shard // 200:05d}.tar")) as sink:
            for path in paths[shard:shard + 200]:
                label = int(path.parent.name.split("_")[1])
                sink.write({"__key__": f"{path.parent.name}_{path.stem}", "png": path.read_bytes(),
                            "cls": str(label).encode()})
    return out


def uniform_distinct_classes() -> float:
    """E[distinct classes] in GLOBAL_BATCH draws without replacement from TOTAL samples, PER_CLASS per class."""
    missing = math.comb(TOTAL - PER_CLASS, GLOBAL_BATCH) / math.comb(TOTAL, GLOBAL_BATCH)
    return NUM_CLASSES * (1 - missing)


def distinct_classes_per_global_batch(shards_dir: Path, data: DataSection, epochs: int = 3) -> list[int]:
    """The two ranks' training loaders, as the trainer builds them (ranks as threads exchanging their
    shortfalls); for each global micro-batch of the first `epochs` epochs, its number of classes."""
    from pipeline.data.full_batches import LocalExchange
    from pipeline.data.labelled import labelled_loader

    shards = resolve_shards(str(shards_dir))
    assert sum(s.num_samples for s in shards) == TOTAL
    exchange, labels = LocalExchange(WORLD, timeout_seconds=60), [None] * WORLD

    def rank_loop(rank: int) -> None:
        out = []
        try:
            for item in labelled_loader(shards, data, rank, WORLD, seed=0, training=True, batch_size=PER_RANK,
                                        exchange=exchange.for_rank(rank)):
                if item.position.epoch >= epochs:
                    break
                out.append(item.batch[1].tolist())
        except Exception:
            exchange.abort()  # a failed rank must not leave the other one waiting
            raise
        labels[rank] = out

    threads = [threading.Thread(target=rank_loop, args=(rank,)) for rank in range(WORLD)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert len(labels[0]) == len(labels[1]) == epochs * (TOTAL // GLOBAL_BATCH)
    return [len(set(a) | set(b)) for a, b in zip(*labels)]


CONFIGS = {  # the default data section, and the smoke recipes' shuffle window (500)
    "defaults": DataSection(image_size_px=16, num_workers_per_rank=0),
    "window_500": DataSection(image_size_px=16, num_workers_per_rank=0, shuffle_buffer=500),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("writer", ["data_prep_shards", "tarwriter_shards"])
def test_global_batches_mix_classes_like_random_draws(writer, config, request):
    counts = distinct_classes_per_global_batch(request.getfixturevalue(writer), CONFIGS[config])
    expected = uniform_distinct_classes()  # about 93.5
    assert np.mean(counts) >= 0.9 * expected, (np.mean(counts), expected, counts)


def test_data_prep_shuffles_rows_by_default_and_records_it(data_prep_shards, class_tree, tmp_path):
    from data_prep.cli import main

    manifest = json.loads((data_prep_shards / "manifest.json").read_text())
    assert manifest["options"]["shuffle_seed"] == 0 and manifest["num_samples"] == TOTAL
    labels = _labels_of(resolve_shards(str(data_prep_shards))[0].path)
    assert len(set(labels)) > 60  # 200 rows drawn from all 100 classes, not 10 classes in a row
    out = tmp_path / "in_order"
    assert main(["labelled", "--input", str(class_tree), "--output", str(out), "--image-size", "16",
                 "--shard-size", "200", "--no-progress", "--no-shuffle"]) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["shuffle_seed"] is None
    assert sorted(set(_labels_of(resolve_shards(str(out))[0].path))) == list(range(10))  # input order kept
    # the seed is part of the job: resuming the folder with another seed is refused
    assert main(["labelled", "--input", str(class_tree), "--output", str(data_prep_shards), "--image-size", "16",
                 "--shard-size", "200", "--no-progress", "--shuffle-seed", "1"]) == 2


def test_preflight_warns_in_one_line_when_blocks_cannot_mix(tarwriter_shards, data_prep_shards, tmp_path, capsys):
    from launch.pretrain import prepared_config

    def warnings(**extra) -> list[str]:
        values = {"run.output_dir": str(tmp_path), "data.train": str(tarwriter_shards), "data.val": "",
                  "data.num_classes": NUM_CLASSES, "data.batch_size_per_rank": PER_RANK, "ray.num_workers": WORLD,
                  **extra}
        capsys.readouterr()
        prepared_config(str(REPO / "configs" / "smoke_resnet.yaml"), [f"{k}={v}" for k, v in values.items()])
        return [line for line in capsys.readouterr().out.splitlines() if "warning" in line]

    assert warnings() == []  # shuffle_block 1: every position an independent draw
    lines = warnings(**{"data.shuffle_block": 64})
    assert len(lines) == 1 and "data.shuffle_block 64" in lines[0] and "shuffle_buffer >=" in lines[0], lines
    assert warnings(**{"data.shuffle_block": 64, "data.shuffle_buffer": 1_000_000}) == []  # window of many blocks
    assert warnings(**{"data.shuffle_block": 64, "data.train": str(data_prep_shards)}) == []  # rows already shuffled


def _labels_of(path: str) -> list[int]:
    from shard_helpers import shard_samples

    return [int(raw["cls"]) for raw in shard_samples(path)]
