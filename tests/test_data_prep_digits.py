"""The digits sample corpus: layout, manifests that match the shards, idempotence, atomicity."""
from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.samples.digits import CLASSNAMES, write_digits_corpus

DATASETS = ("labelled/train", "labelled/val", "image_text/train", "image_text/val", "zeroshot/test")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_corpus(tmp_path_factory.mktemp("digits") / "corpus")


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_and_manifests_match_shards(digits_root: Path) -> None:
    for rel in DATASETS:
        folder = digits_root / rel
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format"] == "resclip-shards/1"
        sizes = json.loads((folder / "sizes.json").read_text())
        info = json.loads((folder / "_info.json").read_text())
        split = rel.split("/")[1]
        assert info["splits"][split]["num_samples"] == manifest["num_samples"]
        assert sorted(p.name for p in folder.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
        for shard in manifest["shards"]:
            data = (folder / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert len(data) == shard["num_bytes"]
            keys = {name.split(".", 1)[0] for name in _members(folder / shard["name"])}
            assert len(keys) == shard["num_samples"] == sizes[shard["name"]] <= 200
        assert manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"])
    train = json.loads((digits_root / "labelled/train/manifest.json").read_text())
    val = json.loads((digits_root / "labelled/val/manifest.json").read_text())
    assert train["num_samples"] + val["num_samples"] == 1797
    assert len(train["shards"]) >= 4 and train["classnames"] == list(CLASSNAMES)
    assert train["num_classes"] == 10 and train["rejected"] == {}


def test_sample_contents(digits_root: Path) -> None:
    labelled = _members(digits_root / "labelled/train/00000.tar")
    key = sorted(labelled)[0].split(".", 1)[0]
    assert {f"{key}.jpg", f"{key}.cls", f"{key}.json"} <= set(labelled)
    label = int(labelled[f"{key}.cls"])
    assert json.loads(labelled[f"{key}.json"])["label"] == label
    captions = set()
    for name, data in _members(digits_root / "image_text/train/00000.tar").items():
        if name.endswith(".txt"):
            captions.add(data.decode())
    assert len(captions) > 20 and any("handwritten digit" in c for c in captions)
    zeroshot = digits_root / "zeroshot"
    assert (zeroshot / "classnames.txt").read_text().split() == list(CLASSNAMES)
    assert "{c}" in (zeroshot / "zeroshot_classification_templates.txt").read_text()
    exts = {n.rsplit(".", 1)[1] for n in _members(zeroshot / "test/0.tar")}
    assert exts == {"cls", "jpg"}


def test_zeroshot_shards_use_clip_benchmark_names(digits_root: Path) -> None:
    """CLIP_benchmark opens test/{0..N-1}.tar with N from nshards.txt; training shards stay padded."""
    test = digits_root / "zeroshot/test"
    nshards = int((test / "nshards.txt").read_text())
    names = [f"{i}.tar" for i in range(nshards)]
    manifest = json.loads((test / "manifest.json").read_text())
    assert nshards >= 2 and [s["name"] for s in manifest["shards"]] == names
    assert sorted(p.name for p in test.glob("*.tar")) == sorted(names)
    assert list(json.loads((test / "sizes.json").read_text())) == names
    assert json.loads((test / "_info.json").read_text())["splits"]["test"]["filenames"] == names
    assert sum(len(_members(test / n)) for n in names) == 2 * manifest["num_samples"]
    assert (digits_root / "labelled/train/00000.tar").is_file()
    assert (digits_root / "image_text/val/00000.tar").is_file()
    assert main(["verify", str(digits_root)]) == 0


def test_legacy_zeroshot_names_are_rewritten(tmp_path: Path, digits_root: Path) -> None:
    """A corpus from before the rename (zeroshot/test/00000.tar) gets its zero-shot set rebuilt."""
    import shutil

    root = tmp_path / "old"
    shutil.copytree(digits_root, root)
    test = root / "zeroshot/test"
    manifest = json.loads((test / "manifest.json").read_text())
    for shard in manifest["shards"]:
        old = f"{int(shard['name'][:-4]):05d}.tar"
        (test / shard["name"]).rename(test / old)
        shard["name"] = old
    (test / "manifest.json").write_text(json.dumps(manifest))
    before = (root / "labelled/train/manifest.json").read_text()
    assert write_digits_corpus(root) == root
    assert not (test / "00000.tar").exists() and (test / "0.tar").is_file()
    assert (test / "manifest.json").read_text() != json.dumps(manifest)
    assert (root / "labelled/train/manifest.json").read_text() == before
    assert sorted(p.name for p in root.iterdir()) == ["image_text", "labelled", "zeroshot"]
    assert main(["verify", str(root)]) == 0


def test_train_and_val_are_disjoint(digits_root: Path) -> None:
    def keys(rel: str) -> set[str]:
        return {n.split(".", 1)[0] for p in (digits_root / rel).glob("*.tar") for n in _members(p)}

    assert not keys("labelled/train") & keys("labelled/val")
    assert keys("labelled/val") == keys("zeroshot/test") == keys("image_text/val")


def test_idempotent_and_deterministic(digits_root: Path, tmp_path: Path) -> None:
    before = (digits_root / "labelled/train/manifest.json").read_text()
    assert write_digits_corpus(digits_root) == digits_root
    assert (digits_root / "labelled/train/manifest.json").read_text() == before
    again = write_digits_corpus(tmp_path / "again")
    for rel in DATASETS:
        shas = [json.loads((r / rel / "manifest.json").read_text())["shards"] for r in (digits_root, again)]
        assert [s["sha256"] for s in shas[0]] == [s["sha256"] for s in shas[1]]
        # ... and each is the hash of the bytes on disk, computed here rather than by data_prep.
        assert [s["sha256"] for s in shas[1]] == [hashlib.sha256((again / rel / s["name"]).read_bytes()).hexdigest()
                                                  for s in shas[1]]


def test_concurrent_writers_leave_one_complete_corpus(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            write_digits_corpus(root)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no staging folder left behind
    assert not list(root.rglob("*.partial"))


def test_cli_sample_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "digits", "--output", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c/zeroshot/test/manifest.json").is_file()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/file").write_text("x")
    assert main(["sample", "digits", "--output", str(tmp_path / "junk")]) == 2
    assert "no complete digits corpus" in capsys.readouterr().err
