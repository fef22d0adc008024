"""A local shard's member index: the raw-header scan (pipeline/data/tar_index.py) gives exactly what tarfile
gives, for the tars that writers produce, and hands the rest to tarfile."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pipeline.data import tar_index


def tarfile_index(path: Path) -> tar_index.Index:
    with tarfile.open(path, "r:") as tar:
        return tar_index.index_members(tar)


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type = (len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0), kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere"
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def write(path: Path, members: list[tuple], tar_format: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for member in members:
            add(tar, *member)
    return path


SAMPLES = [("a/000.jpg", b"x" * 700), ("a/000.cls", b"3"), ("a/000.json", b"{}"), ("__meta__.json", b"{}"),
           ("a/001.JPG", b"y" * 1024), ("a/001.txt", b"a caption"), ("noext", b"z"), ("a/002.tar.gz", b"")]


@pytest.mark.parametrize("tar_format, long_name", [
    (tarfile.USTAR_FORMAT, "d" * 120 + "/003.jpg"),  # split into the ustar prefix and name fields
    (tarfile.GNU_FORMAT, "d/003.jpg"),
    (tarfile.PAX_FORMAT, "\u00e9" * 60 + "/003.jpg"),  # a pax record with the path (non-ASCII, > 100 bytes)
])
def test_plain_headers_are_read_as_tarfile_reads_them(tmp_path, tar_format, long_name):
    members = SAMPLES + [("dir/", b"", tarfile.DIRTYPE), (long_name, b"w" * 10)]
    path = write(tmp_path / "s.tar", members, tar_format)
    scanned = tar_index._scan_plain_headers(path)
    assert scanned is not None and scanned == tarfile_index(path)
    assert [key for key, _ in scanned] == ["a/000", "a/001", "a/002", long_name[:-4]]
    # Headers at 0, 1536 and 2560; data one block after each (700 bytes take two blocks).
    if tar_format != tarfile.PAX_FORMAT:
        assert scanned[0][1] == [("jpg", 512, 700), ("cls", 2048, 1), ("json", 3072, 2)]
    assert tar_index.index_local(path) == scanned


def test_webdataset_and_data_prep_shards_take_the_fast_path(tmp_path):
    import webdataset as wds

    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as sink:
        for index in range(20):
            sink.write({"__key__": f"s{index:05d}", "jpg": bytes(range(index + 1)), "cls": str(index % 3)})
    scanned = tar_index._scan_plain_headers(path)
    assert scanned is not None and len(scanned) == 20 and scanned == tarfile_index(path)
    assert b"mtime=" in path.read_bytes()  # webdataset's members carry pax records: they are parsed here


@pytest.mark.parametrize("case", ["long_name_gnu", "pax_sparse", "symlink", "bad_checksum", "empty", "no_end"])
def test_other_headers_are_left_to_tarfile(tmp_path, case):
    path = tmp_path / "s.tar"
    if case == "long_name_gnu":
        write(path, SAMPLES + [("e" * 150 + ".jpg", b"1")], tarfile.GNU_FORMAT)  # a GNU 'L' record
    elif case == "pax_sparse":  # a pax record with a key that changes more than the path or size
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("g/000.jpg")
            info.size, info.pax_headers = 1, {"GNU.sparse.name": "g/000.jpg"}
            tar.addfile(info, io.BytesIO(b"1"))
    elif case == "symlink":
        write(path, SAMPLES + [("a/009.jpg", b"", tarfile.SYMTYPE)])
    elif case == "bad_checksum":
        write(path, SAMPLES)
        raw = bytearray(path.read_bytes())
        raw[512 * 3] ^= 0x01  # a name byte of the second member's header
        path.write_bytes(bytes(raw))
    elif case == "empty":
        path.write_bytes(b"")
    else:  # members but no end-of-archive blocks
        write(path, SAMPLES)
        path.write_bytes(path.read_bytes()[:512 * 17])  # 8 headers + 9 data blocks
    assert tar_index._scan_plain_headers(path) is None
    if case == "empty":
        with pytest.raises(tarfile.ReadError):
            tar_index.index_local(path)
    else:  # tarfile's answer, whatever it is (a bad checksum ends tarfile's reading there)
        assert tar_index.index_local(path) == tarfile_index(path)


def test_count_samples_reads_the_headers_and_falls_back_for_compressed_and_cut_tars(tmp_path, monkeypatch):
    """A shard's sample count (pipeline.data.shards.count_samples, what a folder without a manifest is sized
    by) comes from the readers' header index, not a stream read of every byte; a gzipped tar is counted by
    the stream read, and a cut one is named."""
    import gzip

    from pipeline.data.shards import count_samples

    path = write(tmp_path / "s.tar", SAMPLES)
    streamed = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: streamed.append(a) or real_open(*a, **k))
    assert count_samples(str(path)) == 3 and not streamed  # a/000, a/001, a/002: no tarfile at all

    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert count_samples(str(packed)) == 4  # the stream read also counts "noext" (its old rule)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:1000])  # inside the first member's data
    with pytest.raises(ValueError, match="cut.tar: not a readable tar shard"):
        count_samples(str(cut))


def test_a_local_index_is_scanned_once_per_version_of_the_file(tmp_path, monkeypatch):
    """The process keeps the index of an unchanged local shard (size, mtime, inode): counting a folder and
    then reading it does not scan its headers twice; a rewritten shard is scanned again."""
    path = write(tmp_path / "s.tar", SAMPLES)
    first = tar_index.read_index(str(path))

    def no_scan(*_args, **_kwargs):
        raise AssertionError("scanned again")

    with monkeypatch.context() as patched:
        patched.setattr(tar_index, "_scan_plain_headers", no_scan)
        patched.setattr(tarfile, "open", no_scan)
        assert tar_index.read_index(str(path)) == first
    write(path, SAMPLES[:3])  # another size and mtime: the old index would point past its members
    assert tar_index.read_index(str(path)) == tarfile_index(path) == [("a/000", first[0][1])]


def test_eval_loader_workers_inherit_the_index_counted_in_the_main_process(tmp_path, monkeypatch):
    """An eval set's shards are indexed once, when the main process counts them: the forked loader workers
    (2 here, ~0.17 CPU s each on a 6,000-image set) reuse it instead of scanning every header again."""
    import multiprocessing

    import torch
    from torchvision import transforms as T

    from pipeline.data.eval_batches import labelled_batches
    from pipeline.evaluation import datasets
    from test_evaluation_helpers import write_toy_zeroshot_set

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("loader workers are forked on Linux only")
    _, _, data = write_toy_zeroshot_set(tmp_path)
    shards = datasets.split_shards(data, "test")  # counts the samples: the main process indexes each shard

    def no_scan(*_args, **_kwargs):
        raise RuntimeError("a loader worker scanned a shard the main process had indexed")

    monkeypatch.setattr(tar_index, "_scan_plain_headers", no_scan)  # inherited by the forked workers
    monkeypatch.setattr(tarfile, "open", no_scan)
    batches = labelled_batches(shards, T.Compose([T.Resize((8, 8)), T.PILToTensor()]), 2, 2)
    labels = torch.cat([item.batch.labels for item in batches if item.batch is not None])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_kept_indexes_are_bounded_by_samples_oldest_out_first(tmp_path, monkeypatch):
    monkeypatch.setattr(tar_index, "_LOCAL_INDEXES", tar_index.collections.OrderedDict())
    monkeypatch.setattr(tar_index, "_local_index_samples", 0)
    monkeypatch.setattr(tar_index, "_LOCAL_INDEX_MAX_SAMPLES", 5)
    one, two = write(tmp_path / "1.tar", SAMPLES), write(tmp_path / "2.tar", SAMPLES)  # 3 samples each
    tar_index.read_index(str(one))
    tar_index.read_index(str(two))
    assert [version[0] for version in tar_index._LOCAL_INDEXES] == [str(two)] and tar_index._local_index_samples == 3
