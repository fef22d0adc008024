"""Preflight: bad datasets and settings are refused in one line, naming key and file, before Ray starts."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from launch.cli import main

REPO = Path(__file__).resolve().parent.parent


def write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def config(tmp_path: Path, train: str, **sections) -> Path:
    data = {"train": train, "num_classes": 10, "batch_size_per_rank": 8, **sections.pop("data", {})}
    body = {"data": data, "run": {"output_dir": str(tmp_path / "runs")}, "ray": {"num_workers": 2}, **sections}
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def good_shards(tmp_path: Path) -> str:
    write_tar(tmp_path / "good" / "000.tar", [{"__key__": f"s{i}", "jpg": jpeg(), "cls": b"1"} for i in range(40)])
    return str(tmp_path / "good")


def case_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return config(tmp_path, str(tmp_path / "empty")), "data.train", "no .tar shards"


def case_glob_matches_nothing(tmp_path):
    return config(tmp_path, str(tmp_path / "nowhere-*.tar")), "data.train", "no shard files match"


def case_brace_file_missing(tmp_path):
    good_shards(tmp_path)
    return config(tmp_path, str(tmp_path / "good" / "{000..001}.tar")), "data.train", "shard file not found"


def case_not_a_tar(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "000.tar").write_bytes(b"this is not a tar file" * 100)
    return config(tmp_path, str(tmp_path / "junk")), "data.train", "not a readable tar shard"


def case_first_sample_has_no_image(tmp_path):
    write_tar(tmp_path / "txt" / "000.tar", [{"__key__": f"s{i}", "txt": b"caption", "cls": b"1"} for i in range(40)])
    return config(tmp_path, str(tmp_path / "txt")), "data.train", "no image"


def case_corrupt_image(tmp_path):
    write_tar(tmp_path / "bad" / "000.tar", [{"__key__": f"s{i}", "jpg": b"\xff\xd8 garbage", "cls": b"1"} for i in range(40)])
    return config(tmp_path, str(tmp_path / "bad")), "data.train", "corrupt image"


def case_classes_unknown(tmp_path):
    path = config(tmp_path, good_shards(tmp_path))
    body = json.loads(path.read_text())
    del body["data"]["num_classes"]
    path.write_text(json.dumps(body))
    return path, "data.num_classes", "manifest does not give num_classes"


def case_val_missing(tmp_path):
    return config(tmp_path, good_shards(tmp_path), data={"val": str(tmp_path / "no-val")}), "data.val", "not found"


def case_unknown_model(tmp_path):
    return config(tmp_path, good_shards(tmp_path), model={"name": "resnet_9000"}), "model.name", "unknown model"


def case_output_dir_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = config(tmp_path, good_shards(tmp_path), run={"output_dir": str(tmp_path / "afile")})
    return path, "run.output_dir", "not writable"


def case_fewer_samples_than_a_global_batch(tmp_path):
    path = config(tmp_path, good_shards(tmp_path), data={"batch_size_per_rank": 64})
    return path, "data.batch_size_per_rank", "fewer than one global batch"


def case_sample_corpus_path_outside_layout(tmp_path):
    path = config(tmp_path, str(tmp_path / "somewhere"), data={"sample_corpus": "digits"})
    return path, "data.train", "must end with one of"


def case_config_file_missing(tmp_path):
    return tmp_path / "nope.yaml", "<file>", "cannot read config"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_dataset_or_setting_is_one_clear_line(case, tmp_path, capsys):
    path, key, words = case(tmp_path)
    code = main(["pretrain", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err and key in err and words in err, err
    assert not (tmp_path / "runs" / "run").exists()  # no run was started
