"""The storage layer against a real S3 API server on 127.0.0.1 (moto's server mode) and local disk."""
from __future__ import annotations

import pytest

from pipeline import storage


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_round_trip_listing_ranges_and_folders(where, tmp_path, request):
    base = str(tmp_path / "base") if where == "local" else request.getfixturevalue("s3_bucket") + "/base"
    storage.write_text(storage.join(base, "a.txt"), "hello world")
    storage.write_bytes(storage.join(base, "sub", "b.bin"), bytes(range(10)))
    assert storage.exists(storage.join(base, "a.txt")) and storage.is_dir(storage.join(base, "sub"))
    assert storage.listdir(base) == ["a.txt", "sub"]
    assert storage.read_bytes(storage.join(base, "a.txt"), 6, 11) == b"world"
    assert storage.size(storage.join(base, "sub", "b.bin")) == 10
    assert [p.rsplit("/", 1)[-1] for p in storage.glob(storage.join(base, "*.txt"))] == ["a.txt"]
    local = storage.download(storage.join(base, "sub"), tmp_path / "down")
    assert (local / "b.bin").read_bytes() == bytes(range(10))
    if where == "s3":
        storage.upload(tmp_path / "down", storage.join(base, "up"))
        assert storage.read_bytes(storage.join(base, "up", "b.bin")) == bytes(range(10))
    storage.remove(storage.join(base, "sub"), recursive=True)
    assert not storage.exists(storage.join(base, "sub", "b.bin"))


def test_unreachable_bucket_is_one_line(s3_server):
    with pytest.raises(storage.StorageError, match=r"data.train: cannot reach s3://no-such-bucket/x"):
        storage.check_reachable("s3://no-such-bucket/x", "data.train")


def test_dead_endpoint_is_one_line_and_quick(s3_server, monkeypatch):
    import time

    from pipeline.trainer import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.time()
    with pytest.raises(storage.StorageError, match="run.output_dir: cannot reach"):
        storage.check_reachable("s3://bucket/runs", "run.output_dir", writable=True)
    assert time.time() - started < 60
