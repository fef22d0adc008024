"""Training data in a bucket (issue 14, data): the stream over s3:// shards is the stream over the same local
shards, sample for sample, with data-prep's index sidecars or a locally cached index for foreign shards;
against a real S3 server (moto's server mode, tests/conftest.py)."""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.manifest import build_manifest, write_dataset_metadata
from data_prep.writer import Sample, write_shards
from pipeline import storage
from pipeline.data.shards import read_manifest, resolve_shards
from pipeline.data.reader import TarSamples
from pipeline.data.stream import EvalStream, Position, ResumableStream
from pipeline.data.tar_index import cache_file

REPO = Path(__file__).resolve().parent.parent
NUM_SHARDS, PER_SHARD = 3, 11


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """data-prep's output: tars, index sidecars, sizes.json, _info.json, manifest.json."""
    folder = tmp_path_factory.mktemp("shards")
    samples = (Sample(f"s{i:04d}", {"jpg": _jpeg(i), "cls": str(i % 3).encode(), "txt": f"caption {i}".encode()})
               for i in range(NUM_SHARDS * PER_SHARD))
    records = write_shards(folder, samples, PER_SHARD)
    manifest = build_manifest("labelled", records, source={}, options={}, classnames=["a", "b", "c"])
    write_dataset_metadata(folder, manifest, split="train", dataset_name="t")
    return folder


def _keys(shards, rank: int, world: int, batches: int, start: Position = Position()) -> list[list[str]]:
    stream = ResumableStream(shards, rank, world, 4, lambda raw: raw["__key__"] + raw["jpg"][-8:].hex(), seed=3,
                             shuffle_window=16, start=start, collate=list)
    return [item.batch for item in itertools.islice(iter(stream), batches)]


def test_stream_over_s3_is_the_local_stream(local_shards, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    import pipeline.data.tar_index as tar_index

    def no_scans(handle):
        raise AssertionError("a data-prep shard's headers were scanned over the network")

    monkeypatch.setattr(tar_index, "index_stream", no_scans)
    assert sorted(p.name for p in local_shards.glob("*.idx.json")) == ["00000.idx.json", "00001.idx.json",
                                                                       "00002.idx.json"]
    url = f"{s3_bucket}/train"
    storage.upload(local_shards, url)
    local, remote = resolve_shards(str(local_shards)), resolve_shards(url)
    assert [s.num_samples for s in remote] == [s.num_samples for s in local]
    assert remote[0].path == f"{url}/00000.tar" and read_manifest(url)["num_classes"] == 3
    # Two ranks, two epochs and a bit (33 samples, global batch 8: 4 micro-batches per epoch).
    for rank in (0, 1):
        assert _keys(remote, rank, 2, 9) == _keys(local, rank, 2, 9)
    # Resume mid-epoch from the bucket continues exactly where the uninterrupted stream is.
    full = _keys(remote, 1, 2, 7)
    assert _keys(remote, 1, 2, 4, start=Position(epoch=0, offset=24)) == full[3:7]
    # data-prep's sidecars served the index: nothing scanned, and the index still cached locally.
    assert len(list((tmp_path / "cache" / "tar_index").glob("*.json"))) == NUM_SHARDS
    # Evaluation reads the same way.
    eval_keys = [k for item in EvalStream(remote, 0, 1, 5, lambda raw: raw["__key__"], collate=list) for k in item.batch]
    assert eval_keys == [f"s{i:04d}" for i in range(NUM_SHARDS * PER_SHARD)]


def test_foreign_shards_get_a_cached_index(local_shards, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    for tar in sorted(local_shards.glob("*.tar")):  # another tool's output: tars only, no counts, no index
        storage.upload(tar, f"{s3_bucket}/foreign/{tar.name}")
    remote = resolve_shards(f"{s3_bucket}/foreign/*.tar")
    assert [s.num_samples for s in remote] == [PER_SHARD] * NUM_SHARDS  # counted by one read, index cached
    entries = sorted((tmp_path / "cache" / "tar_index").glob("*.json"))
    assert entries == sorted(cache_file(s.path, storage.size(s.path)) for s in remote)
    local = resolve_shards(str(local_shards))
    assert _keys(remote, 0, 2, 5) == _keys(local, 0, 2, 5)
    # A folder of foreign tars resolves the same, and a second store reads from the cache.
    assert [s.path for s in resolve_shards(f"{s3_bucket}/foreign")] == [s.path for s in remote]
    assert TarSamples().read(remote[2].path, 10)["__key__"] == "s0032"


def test_benchmark_data_reads_a_bucket(local_shards, s3_bucket, tmp_path):
    url = f"{s3_bucket}/bench"
    storage.upload(local_shards, url)
    result = subprocess.run(
        [sys.executable, "-m", "launch", "benchmark-data", "--config", "configs/smoke_resnet.yaml", "--data", url,
         "--batch-size", "4", "--workers", "1", "--steps", "3", "--image-size", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**_env(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "labelled shards: s3://" in result.stdout and "samples/s" in result.stdout


def test_unreachable_data_bucket_is_one_line(s3_server, tmp_path):
    from launch.prepare import preflight
    from pipeline.config import ConfigError, load_config

    cfg = load_config(str(REPO / "configs/smoke_resnet.yaml"),
                      ["data.train=s3://no-such-bucket-here/train", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, "smoke_resnet.yaml")
    message = str(err.value)
    assert "\n" not in message and "data.train" in message and "s3://no-such-bucket-here/train" in message


def _env(tmp_path: Path) -> dict:
    import os

    return {**os.environ, "RESCLIP_CACHE": str(tmp_path / "cache")}


def test_data_prep_to_a_bucket_and_rerun_after_a_kill(s3_bucket, tmp_path, monkeypatch, capsys):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.cli import main

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    pq.write_table(pa.table({"image": [_jpeg(40 * i) for i in range(10)],
                             "caption": [f"caption {i}" for i in range(10)]}), tmp_path / "t.parquet")
    url = f"{s3_bucket}/ds"
    argv = ["image-text", "--input", str(tmp_path / "t.parquet"), "--output", url, "--caption-col", "caption",
            "--bytes-col", "image", "--shard-size", "4", "--image-size", "16", "--no-progress"]
    assert main(argv) == 0
    names = storage.listdir(url)
    assert {"00000.tar", "00000.idx.json", "00000.stats.parquet", "00002.tar", "manifest.json",
            "sizes.json"} <= set(names)
    first = read_manifest(url)
    assert [s.num_samples for s in resolve_shards(url)] == [4, 4, 2]
    assert not list((tmp_path / "cache" / "data_prep_staging").rglob("*.tar"))  # uploaded, not kept
    # Killed before the last shard finished, then rerun on another machine (empty staging).
    for name in ("manifest.json", "00002.stats.parquet", "00002.tar"):
        storage.remove(f"{url}/{name}")
    shutil.rmtree(tmp_path / "cache" / "data_prep_staging")
    capsys.readouterr()
    assert main(argv) == 0
    assert "(1 partitions run" in capsys.readouterr().out
    again = read_manifest(url)
    assert again["shards"] == first["shards"]  # byte-identical shards (same sha256)
    keys = [k for item in EvalStream(resolve_shards(url), 0, 1, 4, lambda raw: raw["txt"], collate=list)
            for k in item.batch]
    assert sorted(keys) == sorted(f"caption {i}".encode() for i in range(10))


def test_launch_eval_reads_a_set_from_a_bucket(s3_bucket, tmp_path, monkeypatch, capsys):
    from launch import eval_cmd
    from test_evaluation_helpers import write_toy_zeroshot_set

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    name, _, data = write_toy_zeroshot_set(tmp_path)
    storage.upload(data, f"{s3_bucket}/wds_toy")
    import argparse

    parser = argparse.ArgumentParser(prog="launch")
    eval_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    results = []
    for where in (str(data), f"{s3_bucket}/wds_toy", f"{s3_bucket}/wds_toy"):  # the second bucket run: cached
        args = parser.parse_args(["eval", "zeroshot", "--checkpoint", str(tmp_path / "tiny.pt"), "--model", name,
                                  "--data", where, "--workers", "0", "--device", "cpu"])
        assert args.func(args) == 0
        results.append(json.loads(capsys.readouterr().out)["metrics"])
    assert results[0] == results[1] == results[2] and results[0]["num_samples"] == 6
