"""data_prep building blocks: image normalisation, table reading, shard writing, CLI errors."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.images import ImageOptions, RowRejected, process_image, resize
from data_prep.tables import read_table, require_columns
from data_prep.writer import Sample, write_shards


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                      ("L", "JPEG"), ("I;16", "PNG"), ("1", "PNG")])
def test_modes_become_rgb_jpeg(mode: str, fmt: str) -> None:
    image = Image.new(mode, (40, 20))
    encoded = process_image(_encode(image, fmt), ImageOptions(image_size=10))
    out = _decode(encoded.data)
    assert (encoded.ext, out.format, out.mode, out.size) == ("jpg", "JPEG", "RGB", (20, 10))
    assert (encoded.original_width, encoded.original_height) == (40, 20)


def test_sixteen_bit_keeps_brightness_and_alpha_goes_over_white() -> None:
    bright = Image.fromarray(np.full((8, 8), 60000, np.uint16))
    out = _decode(process_image(_encode(bright, "PNG"), ImageOptions(8)).data).convert("L")
    assert 225 <= np.asarray(out).mean() <= 240
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = _decode(process_image(_encode(clear, "PNG"), ImageOptions(8)).data)
    assert np.asarray(out).mean() > 245


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (60, 30), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed upright as 30 x 60
    encoded = process_image(_encode(image, "JPEG", exif=exif), ImageOptions(15))
    assert (encoded.original_width, encoded.original_height) == (30, 60)
    assert _decode(encoded.data).size == (15, 30)


def test_resize_modes_and_draft_decoding() -> None:
    big = _encode(Image.new("RGB", (1600, 1200), (9, 99, 199)), "JPEG")
    shorter = process_image(big, ImageOptions(256, "shorter"))
    assert (shorter.width, shorter.height) == (341, 256)
    assert (shorter.original_width, shorter.original_height) == (1600, 1200)
    crop = process_image(big, ImageOptions(256, "center-crop"))
    assert _decode(crop.data).size == (256, 256)
    kept = process_image(big, ImageOptions(256, "none"))
    assert kept.data == big and kept.ext == "jpg"  # nothing to change: original bytes kept
    png = _encode(Image.new("RGB", (30, 30)), "PNG")
    assert process_image(png, ImageOptions(8, "none")).ext == "png"


def test_resample_filters() -> None:
    """area (default, as img2dataset): box-average when shrinking, bicubic when enlarging."""
    checker = Image.fromarray((np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    shrunk = np.asarray(resize(checker, 4, "shorter"))
    assert shrunk.min() >= 127 and shrunk.max() <= 128  # every output pixel averages 2x2 sources
    grown = np.asarray(resize(checker, 32, "shorter"))
    assert len(np.unique(grown)) > 2  # interpolated, not blocks of repeated pixels
    assert not np.array_equal(np.asarray(resize(checker, 4, "shorter", "bicubic")), shrunk)
    assert ImageOptions().resample == "area"
    with pytest.raises(ValueError, match="resample"):
        ImageOptions(resample="nearest")


@pytest.mark.parametrize("raw,reason", [
    (b"", "empty_file"),
    (b"definitely not an image", "not_an_image"),
    (_encode(Image.new("RGB", (64, 64)), "JPEG")[:300], "corrupt_image"),
    (_encode(Image.new("RGB", (10, 10)), "PNG"), "too_small"),
])
def test_bad_images_rejected_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RowRejected) as info:
        process_image(raw, ImageOptions(8, min_image_size=16))
    assert info.value.reason == reason


def test_image_options_validated() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        ImageOptions(resize_mode="stretch")


def test_tables_of_every_format(tmp_path: Path) -> None:
    rows = [{"url": f"u{i}", "caption": f"c{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("url,caption\nu0,c0\nu1,\"multi\nline\"\nu2,c2,EXTRA\n")
    (tmp_path / "c.tsv").write_text("url\tcaption\nu0\tc0\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"url": "u0", "caption": "c0"}\n{broken\n[1, 2]\n{"url": "u1", "caption": "c1"}\n')
    counts = {}
    for name in ("a.parquet", "b.csv", "c.tsv", "d.jsonl.gz"):
        loaded = read_table(tmp_path / name)
        require_columns(loaded, ["url", "caption"])
        counts[name] = (loaded.table.num_rows, loaded.num_unreadable_rows)
    assert counts == {"a.parquet": (3, 0), "b.csv": (2, 1), "c.tsv": (1, 0), "d.jsonl.gz": (2, 2)}
    with pytest.raises(ValueError, match="no column 'text'"):
        require_columns(read_table(tmp_path / "a.parquet"), ["text"])


def test_unreadable_tables_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="unreadable parquet"):
        read_table(tmp_path / "x.parquet")
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown table type"):
        read_table(tmp_path / "x.xlsx")


def test_write_shards_atomic_names_and_counts(tmp_path: Path) -> None:
    samples = (Sample(f"k{i}", {"txt": b"t", "cls": b"1"}) for i in range(5))
    records = write_shards(tmp_path, samples, samples_per_shard=2)
    assert [(r.name, r.num_samples) for r in records] == [("00000.tar", 2), ("00001.tar", 2), ("00002.tar", 1)]
    assert not list(tmp_path.glob("*.partial"))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames() == ["k0.cls", "k0.txt", "k1.cls", "k1.txt"]
    # Eval sets: CLIP_benchmark's unpadded 0.tar, 1.tar, ...
    records = write_shards(tmp_path / "eval", iter([Sample("a", {"cls": b"0"})] * 3), 2, padded=False)
    assert [r.name for r in records] == ["0.tar", "1.tar"]


def _tarfile_shard(samples: list[Sample]) -> bytes:
    """A shard as the stdlib tarfile's stream mode writes it (data-prep's writer before its header template)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for sample in samples:
            for ext in sorted(sample.files):
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(sample.files[ext]), 1_700_000_000, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(sample.files[ext]))
    return out.getvalue()


def test_write_shards_bytes_as_tarfile_writes_them_and_index_as_read_back(tmp_path: Path) -> None:
    from pipeline.data.tar_index import from_json, index_local

    samples = [Sample(key, {"jpg": b"\xff" * size, "txt": "caption é".encode(), "JSON": b"{}"})
               for key, size in [("k0", 0), ("k1", 511), ("k2", 512), ("k3", 513), ("k4", 10_240),
                                 ("x" * 95, 7), ("y" * 97, 9),  # names of 100 and 102 characters
                                 ("clé_ünïcode", 3), ("__hidden", 5), ("k5", 1)]]
    records = write_shards(tmp_path, iter(samples), samples_per_shard=len(samples))
    data = (tmp_path / "00000.tar").read_bytes()
    assert data == _tarfile_shard(samples)
    assert (records[0].num_bytes, records[0].sha256) == (len(data), hashlib.sha256(data).hexdigest())
    sidecar = from_json((tmp_path / "00000.idx.json").read_text(), len(data))
    assert sidecar == index_local(tmp_path / "00000.tar") and len(sidecar) == len(samples) - 1


def test_cli_bad_input_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(pa.table({"u": ["x"], "c": ["y"]}), tmp_path / "t.parquet")
    code = main(["image-text", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "o"),
                 "--caption-col", "caption", "--url-col", "u", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no column 'caption'" in err and "Traceback" not in err
    assert main(["labelled", "--input", str(tmp_path / "nothere*.csv"), "--output", str(tmp_path / "o2"),
                 "--path-col", "p", "--label-col", "l"]) == 2
    assert "no file matches" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage line, exit code 2
        main(["image-text", "--input", "x", "--output", "y", "--caption-col", "c"])
    assert exit_info.value.code == 2
