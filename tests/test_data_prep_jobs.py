"""End to end: every input kind through the real job driver (local and Ray), bad rows counted with
reasons, resume after a kill, --retry-failed, verify, and our shards read by other loaders.
URL tests talk only to a loopback HTTP server started here."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from loopback_server import LoopbackServer

COLOURS = [(i * 20 % 256, i * 50 % 256, i * 90 % 256) for i in range(12)]


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


class _Server(LoopbackServer):
    """Loopback image server: /img/N.jpg, /missing (404), /slow (sleeps), /corrupt, /flaky/N
    (503 while `broken`), /drip/N.jpg (delays each image, for the kill test)."""

    def __init__(self) -> None:
        self.broken = True
        super().__init__(lambda path: (*self.respond(path), []))

    def respond(self, path: str) -> tuple[int, bytes]:
        name = path.rsplit("/", 1)[-1].split(".")[0]
        if path.startswith("/img/"):
            return 200, _jpeg(COLOURS[int(name)])
        if path.startswith("/drip/"):
            time.sleep(0.25)
            return 200, _jpeg(COLOURS[int(name)])
        if path.startswith("/flaky/"):
            return (503, b"") if self.broken else (200, _jpeg(COLOURS[int(name)]))
        if path == "/slow":
            time.sleep(3)
            return 200, _jpeg(COLOURS[0])
        if path == "/corrupt":
            return 200, b"\xff\xd8\xff\xe0 this is not really a jpeg"
        return 404, b"not found"


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*argv: str) -> None:
    assert main([*argv, "--no-progress"]) == 0


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in _manifest(folder)["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _stats(folder: Path) -> list[dict]:
    return [row for p in sorted(folder.glob("*.stats.parquet")) for row in pq.read_table(p).to_pylist()]


def _check_accounting(folder: Path, num_input_rows: int) -> dict:
    """Every input row is either a sample or a counted rejection; verify agrees with the files."""
    manifest = _manifest(folder)
    assert manifest["num_input_rows"] == num_input_rows
    assert manifest["num_samples"] + sum(manifest["rejected"].values()) == num_input_rows
    assert len(_samples(folder)) == manifest["num_samples"]
    assert main(["verify", str(folder)]) == 0
    return manifest


def test_url_table_with_bad_rows(tmp_path: Path, server: _Server) -> None:
    urls = [f"{server.base}/img/{i}.jpg" for i in range(5)] + [
        f"{server.base}/missing", f"{server.base}/slow", f"{server.base}/corrupt",
        f"http://127.0.0.1:{_closed_port()}/x.jpg", "ftp://127.0.0.1/x.jpg", None]
    captions = [f"colour {i}" for i in range(5)] + ["a", "b", "c", "d", "e", "f"]
    captions[1] = "   "  # empty caption: never downloaded
    table = pa.table({"url": urls, "caption": captions, "source_id": list(range(11))})
    pq.write_table(table, tmp_path / "t.parquet")
    _run("image-text", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out"),
         "--caption-col", "caption", "--url-col", "url", "--shard-size", "4", "--image-size", "32",
         "--timeout", "0.5", "--retries", "1", "--user-agent", "data-prep-test/1")
    manifest = _check_accounting(tmp_path / "out", 11)
    assert manifest["rejected"] == {"connection_error": 1, "corrupt_image": 1, "empty_caption": 1,
                                    "http_404": 1, "invalid_url": 1, "missing_url": 1, "timeout": 1}
    assert server.requests.count("/slow") == 2  # a timeout is retried
    assert server.requests.count("/missing") == 1  # a 404 is not
    assert server.user_agents == {"data-prep-test/1"}
    sample = next(s for s in _samples(tmp_path / "out").values() if s["txt"] == b"colour 3")
    meta = json.loads(sample["json"])
    assert meta["source_id"] == 3 and meta["url"].endswith("/img/3.jpg")
    assert (meta["original_width"], meta["original_height"], meta["height"]) == (80, 60, 32)
    statuses = {r["source_row"]: r["status"] for r in _stats(tmp_path / "out")}
    assert statuses[5] == "http_404" and statuses[0] == "ok" and len(statuses) == 11


def test_path_table_csv_relative_paths_and_bad_files(tmp_path: Path) -> None:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    (images / "zero.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("plain text")
    rows = ["path,caption,key"] + [f"images/{i}.jpg,caption {i},k{i}" for i in range(4)] + [
        "images/zero.jpg,zero,k4", "images/notes.jpg,notes,k5", "images/absent.jpg,absent,k6",
        "images/0.jpg,dup key,k0", "images/1.jpg,bad key,a.b", "images/2.jpg,too,many,fields"]
    table = tmp_path / "data" / "captions.csv"
    table.write_bytes(("\n".join(rows) + "\n").encode() + b"images/3.jpg,\xff\xfe bad utf8,k9\n")
    _run("image-text", "--input", str(tmp_path / "data" / "*.csv"), "--output", str(tmp_path / "out"),
         "--caption-col", "caption", "--path-col", "path", "--key-col", "key", "--image-size", "16")
    manifest = _check_accounting(tmp_path / "out", 11)
    assert manifest["rejected"] == {"caption_not_utf8": 1, "duplicate_key": 1, "empty_file": 1,
                                    "invalid_key": 1, "missing_file": 1, "not_an_image": 1,
                                    "unreadable_row": 1}
    assert sorted(_samples(tmp_path / "out")) == ["k0", "k1", "k2", "k3"]


def test_bytes_column_dedup_and_resize_none(tmp_path: Path) -> None:
    blobs = [_jpeg(COLOURS[i % 3]) for i in range(6)] + [b"garbage"]
    pq.write_table(pa.table({"img": blobs, "text": [f"t{i}" for i in range(7)]}), tmp_path / "b.parquet")
    _run("image-text", "--input", str(tmp_path / "b.parquet"), "--output", str(tmp_path / "out"),
         "--caption-col", "text", "--bytes-col", "img", "--resize-mode", "none", "--dedup",
         "--shard-size", "2")
    manifest = _check_accounting(tmp_path / "out", 7)
    assert manifest["rejected"] == {"duplicate_image": 3, "not_an_image": 1}
    samples = _samples(tmp_path / "out")
    assert sorted(s["jpg"] for s in samples.values()) == sorted(blobs[:3])  # original bytes kept
    assert all("img" not in json.loads(s["json"]) for s in samples.values())


def test_image_folder_with_val_split_and_timm_reader(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for name in ("cat", "dog", "fish"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            (root / name / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    (root / "fish" / "broken.jpg").write_bytes(_jpeg(COLOURS[0])[:200])
    (root / "stray.jpg").write_bytes(_jpeg(COLOURS[0]))
    _run("labelled", "--input", str(root), "--output", str(tmp_path / "out"), "--val-fraction", "0.3",
         "--shard-size", "8", "--image-size", "24")
    train, val = _manifest(tmp_path / "out/train"), _manifest(tmp_path / "out/val")
    assert train["classnames"] == ["cat", "dog", "fish"] and train["num_classes"] == 3
    total_rejected = sum(train["rejected"].values()) + sum(val["rejected"].values())
    assert train["num_samples"] + val["num_samples"] + total_rejected == 32
    assert {**train["rejected"], **val["rejected"]}.keys() == {"corrupt_image", "outside_class_folder"}
    assert 3 <= val["num_samples"] <= 16 and main(["verify", str(tmp_path / "out")]) == 0
    train_keys = {json.loads(s["json"])["path"] for s in _samples(tmp_path / "out/train").values()}
    val_keys = {json.loads(s["json"])["path"] for s in _samples(tmp_path / "out/val").values()}
    assert not train_keys & val_keys
    _run("labelled", "--input", str(root), "--output", str(tmp_path / "again"), "--val-fraction", "0.3")
    assert {json.loads(s["json"])["path"] for s in _samples(tmp_path / "again/val").values()} == val_keys

    from timm.data import create_dataset

    dataset = create_dataset("wds/tree", root=str(tmp_path / "out"), split="val", is_training=False)
    labels = sorted(label for _, label in dataset)
    assert len(labels) == val["num_samples"] and set(labels) <= {0, 1, 2}


def test_labelled_table_with_int_labels_and_zeroshot_eval_set(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_jpeg(COLOURS[i]))
    pq.write_table(pa.table({"file": [f"{i}.png" for i in range(6)], "y": [0, 1, 2, 0, 1, None]}),
                   tmp_path / "l.parquet")
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    (tmp_path / "templates.txt").write_text("a photo of {c}.\nart of {c}.\n")
    _run("eval-set", "zeroshot", "--input", str(tmp_path / "l.parquet"), "--output", str(tmp_path / "zs"),
         "--path-col", "file", "--label-col", "y", "--classnames", str(tmp_path / "names.txt"),
         "--templates", str(tmp_path / "templates.txt"), "--image-size", "16")
    manifest = _check_accounting(tmp_path / "zs/test", 6)
    assert manifest["rejected"] == {"missing_label": 1} and manifest["kind"] == "zeroshot"
    assert (tmp_path / "zs/classnames.txt").read_text().split() == ["zero", "one", "two"]
    assert (tmp_path / "zs/test/nshards.txt").read_text().strip() == "1"
    samples = _samples(tmp_path / "zs/test")
    assert {frozenset(s) for s in samples.values()} == {frozenset({"jpg", "cls"})}
    assert sorted(int(s["cls"]) for s in samples.values()) == [0, 0, 1, 1, 2]
    assert [p.name for p in (tmp_path / "zs/test").glob("*.tar")] == ["0.tar"]


def test_eval_set_shards_are_0_to_n_minus_1_without_gaps(tmp_path: Path) -> None:
    """CLIP_benchmark reads test/{0..N-1}.tar with N from nshards.txt: unpadded names, and a
    partition whose rows were all rejected still leaves an (empty) shard, so no number is missing.
    Our own eval readers (find_shards, resolve_shards) read the same folder."""
    import braceexpand
    import webdataset as wds

    from pipeline.data.shards import resolve_shards
    from pipeline.evaluation.datasets import find_shards

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    files = ["0.jpg", "1.jpg", "gone.jpg", "gone2.jpg", "2.jpg"]
    pq.write_table(pa.table({"file": files, "y": ["a", "b", "a", "b", "a"]}), tmp_path / "l.parquet")
    _run("eval-set", "zeroshot", "--input", str(tmp_path / "l.parquet"), "--output", str(tmp_path / "zs"),
         "--path-col", "file", "--label-col", "y", "--image-size", "16", "--shard-size", "2")
    test = tmp_path / "zs/test"
    manifest = _check_accounting(test, 5)
    nshards = int((test / "nshards.txt").read_text())
    names = [f"{i}.tar" for i in range(nshards)]
    assert nshards == 3 and [s["name"] for s in manifest["shards"]] == names
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 0, 1]
    assert json.loads((test / "sizes.json").read_text()) == {"0.tar": 2, "1.tar": 0, "2.tar": 1}
    assert json.loads((test / "_info.json").read_text())["splits"]["test"]["filenames"] == names
    assert sorted(p.name for p in test.glob("*.stats.parquet")) == [f"{i}.stats.parquet" for i in range(3)]
    # What CLIP_benchmark's webdataset loader does with nshards.txt.
    urls = list(braceexpand.braceexpand(f"{test}/{{0..{nshards - 1}}}.tar"))
    labels = sorted(int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False))
    assert labels == [0, 0, 1]
    assert sorted(p.name for p in find_shards(tmp_path / "zs", "test")) == sorted(names)
    assert sum(s.num_samples for s in resolve_shards(str(test))) == 3
    # Re-running resumes (nothing to redo); --retry-failed keeps the numbering.
    _run("eval-set", "zeroshot", "--input", str(tmp_path / "l.parquet"), "--output", str(tmp_path / "zs"),
         "--path-col", "file", "--label-col", "y", "--image-size", "16", "--shard-size", "2",
         "--retry-failed")
    assert [s["name"] for s in _check_accounting(test, 5)["shards"]] == names


def test_eval_set_refuses_a_folder_with_old_padded_shards(tmp_path: Path) -> None:
    (tmp_path / "0.jpg").write_bytes(_jpeg(COLOURS[0]))
    pq.write_table(pa.table({"file": ["0.jpg"], "y": ["a"]}), tmp_path / "l.parquet")
    args = ["eval-set", "zeroshot", "--input", str(tmp_path / "l.parquet"), "--output",
            str(tmp_path / "zs"), "--path-col", "file", "--label-col", "y", "--image-size", "16"]
    _run(*args)
    job = json.loads((tmp_path / "zs/test/_job.json").read_text())
    del job["shard_names"]  # what a data-prep from before the rename wrote
    (tmp_path / "zs/test/_job.json").write_text(json.dumps(job))
    assert main([*args, "--no-progress"]) == 2


def test_retrieval_eval_set_groups_captions(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    rows = {"image": ["0.jpg", "0.jpg", "1.jpg", "2.jpg", "2.jpg", "2.jpg"],
            "text": ["a red one", "the first", "second", "third a", None, "third c"]}
    pq.write_table(pa.table(rows), tmp_path / "r.parquet")
    _run("eval-set", "retrieval", "--input", str(tmp_path / "r.parquet"), "--output", str(tmp_path / "rt"),
         "--caption-col", "text", "--path-col", "image", "--image-size", "16")
    manifest = _manifest(tmp_path / "rt/test")
    assert (manifest["num_samples"], manifest["num_captions"], manifest["rejected"]) == (3, 5, {"missing_caption": 1})
    texts = sorted(s["txt"].decode().splitlines() for s in _samples(tmp_path / "rt/test").values())
    assert texts == [["a red one", "the first"], ["second"], ["third a", "third c"]]
    assert (tmp_path / "rt/dataset_type.txt").read_text().strip() == "retrieval"
    assert [s["name"] for s in manifest["shards"]] == ["0.tar"]
    assert (tmp_path / "rt/test/nshards.txt").read_text().strip() == "1"
    assert [p.name for p in (tmp_path / "rt/test").glob("*.tar")] == ["0.tar"]


def test_ray_workers_match_local_run(tmp_path: Path, server: _Server, ray_session: object) -> None:
    urls = [f"{server.base}/img/{i % 8}.jpg" for i in range(12)] + [f"{server.base}/missing"]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(13)]}), tmp_path / "u.parquet")
    common = ["image-text", "--input", str(tmp_path / "u.parquet"), "--caption-col", "caption",
              "--url-col", "url", "--shard-size", "3", "--image-size", "16", "--dedup"]
    _run(*common, "--output", str(tmp_path / "local"))
    _run(*common, "--output", str(tmp_path / "ray"), "--workers", "2", "--executor", "ray")
    local, ray_run = _manifest(tmp_path / "local"), _check_accounting(tmp_path / "ray", 13)
    assert ray_run["rejected"] == local["rejected"] == {"duplicate_image": 4, "http_404": 1}
    assert ray_run["num_samples"] == local["num_samples"] == 8
    # No duplicate pixels survive, whichever Ray task claimed an image first.
    assert len({s["jpg"] for s in _samples(tmp_path / "ray").values()}) == 8


def test_retry_failed_reprocesses_only_failures(tmp_path: Path, server: _Server) -> None:
    urls = [f"{server.base}/img/{i}.jpg" for i in range(4)] + [f"{server.base}/flaky/{i}.jpg" for i in (4, 5)]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(6)]}), tmp_path / "f.parquet")
    args = ["image-text", "--input", str(tmp_path / "f.parquet"), "--output", str(tmp_path / "out"),
            "--caption-col", "caption", "--url-col", "url", "--shard-size", "4", "--retries", "0",
            "--image-size", "16", "--no-shuffle"]  # input order: the flaky rows are shard 1's alone
    server.broken = True
    _run(*args)
    assert _manifest(tmp_path / "out")["rejected"] == {"http_503": 2}
    first_shard = (tmp_path / "out/00000.tar").stat().st_mtime_ns
    server.broken = False
    server.requests.clear()
    _run(*args)  # plain re-run: everything is complete, nothing is fetched
    assert server.requests == []
    _run(*args, "--retry-failed")
    assert sorted(server.requests) == ["/flaky/4.jpg", "/flaky/5.jpg"]
    manifest = _check_accounting(tmp_path / "out", 6)
    assert manifest["rejected"] == {} and manifest["num_samples"] == 6
    assert (tmp_path / "out/00000.tar").stat().st_mtime_ns == first_shard
    assert [s["key"] for s in _stats(tmp_path / "out")] == sorted(_samples(tmp_path / "out"))


@pytest.mark.integration  # a data-prep subprocess killed mid-job
def test_resume_after_kill_mid_job(tmp_path: Path, server: _Server) -> None:
    urls = [f"{server.base}/drip/{i % 12}.jpg" for i in range(16)]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(16)]}), tmp_path / "d.parquet")
    args = ["image-text", "--input", str(tmp_path / "d.parquet"), "--output", str(tmp_path / "out"),
            "--caption-col", "caption", "--url-col", "url", "--shard-size", "2", "--threads", "1",
            "--image-size", "16", "--no-progress"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(list((tmp_path / "out").glob("*.stats.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.stats.parquet")}
    assert 2 <= len(done_before) < 8 and not (tmp_path / "out/manifest.json").exists()
    for tar_path in (tmp_path / "out").glob("*.tar"):  # whatever is named .tar is a whole tar
        with tarfile.open(tar_path) as tar:
            assert len(tar.getnames()) == 6
    assert main(args) == 0
    _check_accounting(tmp_path / "out", 16)
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in done_before.items())


def test_verify_detects_tampering(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    pq.write_table(pa.table({"p": [f"{i}.jpg" for i in range(4)], "c": list("abcd")}), tmp_path / "t.parquet")
    _run("image-text", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out"),
         "--caption-col", "c", "--path-col", "p", "--shard-size", "2", "--image-size", "16")
    assert main(["verify", str(tmp_path / "out")]) == 0
    shard = tmp_path / "out/00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # flip a byte inside the first image
    shard.write_bytes(bytes(data))
    (tmp_path / "out/00009.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "00001.tar: sha256 differs" in err and "00009.tar: shard on disk but not in the manifest" in err


def test_resume_refuses_a_different_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "0.jpg").write_bytes(_jpeg(COLOURS[0]))
    pq.write_table(pa.table({"p": ["0.jpg"], "c": ["a"]}), tmp_path / "t.parquet")
    args = ["image-text", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out"),
            "--caption-col", "c", "--path-col", "p", "--no-progress"]
    assert main([*args, "--image-size", "16"]) == 0
    assert main([*args, "--image-size", "32"]) == 2
    assert "different job" in capsys.readouterr().err


def test_shards_read_by_project_loader(tmp_path: Path) -> None:
    shards_mod = pytest.importorskip("pipeline.data.shards")
    from data_prep.samples.digits import write_digits_corpus

    root = write_digits_corpus(tmp_path / "digits")
    shards = shards_mod.resolve_shards(str(root / "labelled/train"))
    assert sum(s.num_samples for s in shards) == _manifest(root / "labelled/train")["num_samples"]
    from shard_helpers import shard_samples

    samples = [raw for s in shards for raw in shard_samples(s.path)]
    assert len(samples) == sum(s.num_samples for s in shards)
    assert {"jpg", "cls", "json"} <= set(samples[0])
