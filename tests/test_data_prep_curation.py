"""Curation inside the sharding step (#16): opt-outs a server sends (X-Robots-Tag) drop rows as `opt_out`,
and `data-prep stats` (also written after every job) reports what a corpus holds, with numbers that equal
the manifest and stats parquet. Jobs run in-process (--workers 1, no Ray); URLs come from a loopback server."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.opt_out import disallowing_directive, parse_directive_list, robots_tokens
from loopback_server import LoopbackServer, Response

# Path prefix -> the X-Robots-Tag values the server sends with the image (one header line each).
ROBOTS_HEADERS = {
    "plain": [],
    "noai": ["noai"],
    "otherbot": ["otherbot: noindex"],          # addressed to another robot: not for us
    "noimageai": ["noimageai, nofollow"],
    "ours": ["data-prep: noimageindex"],        # addressed to our user agent's token
    "lines": ["otherbot: noai", "NoIndex"],     # two header lines, the second for every robot
    "dated": ["unavailable_after: 25 Jun 2010 15:00:00 PST"],  # a directive with a colon, not a robot
}
OPTED_OUT = {"noai": "noai", "noimageai": "noimageai", "ours": "noimageindex", "lines": "noindex"}


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


class _RobotsServer(LoopbackServer):
    """Serves /PREFIX/N.jpg (an N-coloured image, 40+N x 30 px) with PREFIX's X-Robots-Tag lines."""

    def __init__(self) -> None:
        super().__init__(self.respond)

    @staticmethod
    def respond(path: str) -> Response:
        prefix, name = path.strip("/").split("/")
        index = int(name.split(".")[0])
        body = _jpeg((index * 20 % 256, 90, 200), (40 + index, 30))
        return 200, body, [("X-Robots-Tag", value) for value in ROBOTS_HEADERS[prefix]]


@pytest.fixture(scope="module")
def robots_server() -> Iterator[_RobotsServer]:
    srv = _RobotsServer()
    yield srv
    srv.close()


def _url_table(tmp_path: Path, base: str) -> tuple[Path, list[str]]:
    prefixes = [p for p in ROBOTS_HEADERS for _ in range(2)]  # two rows per kind of header
    urls = [f"{base}/{prefix}/{i}.jpg" for i, prefix in enumerate(prefixes)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a picture {i}" for i in range(len(urls))]}),
                   tmp_path / "urls.parquet")
    return tmp_path / "urls.parquet", prefixes


def _image_text(table: Path, out: Path, *extra: str) -> dict:
    assert main(["image-text", "--input", str(table), "--output", str(out), "--caption-col", "caption",
                 "--url-col", "url", "--image-size", "16", "--shard-size", "5", "--retries", "0",
                 "--no-progress", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _stats_rows(folder: Path) -> list[dict]:
    return [row for p in sorted(folder.glob("*.stats.parquet")) for row in pq.read_table(p).to_pylist()]


@pytest.mark.integration
def test_opt_out_rows_are_dropped_with_their_directive(tmp_path: Path, robots_server: _RobotsServer) -> None:
    table, prefixes = _url_table(tmp_path, robots_server.base)
    manifest = _image_text(table, tmp_path / "out")
    assert manifest["num_input_rows"] == len(prefixes) == manifest["num_samples"] + sum(manifest["rejected"].values())
    assert manifest["rejected"] == {"opt_out": 2 * len(OPTED_OUT)}
    for row in _stats_rows(tmp_path / "out"):
        prefix = row["path"].split("/")[-2]
        if prefix in OPTED_OUT:
            assert row["status"] == "opt_out" and row["detail"].startswith(OPTED_OUT[prefix] + " (X-Robots-Tag: ")
        else:
            assert row["status"] == "ok", row
    assert main(["verify", str(tmp_path / "out")]) == 0

    # An empty list obeys no directive: every row is kept.
    kept = _image_text(table, tmp_path / "all", "--disallowed-header-directives", "")
    assert kept["num_samples"] == len(prefixes) and kept["rejected"] == {}
    # A custom list: only noai counts now.
    only_noai = _image_text(table, tmp_path / "noai", "--disallowed-header-directives", "NoAI")
    assert only_noai["rejected"] == {"opt_out": 2}


def test_x_robots_tag_semantics() -> None:
    tokens = robots_tokens("mybot/2.0 (+https://example.org)")
    assert tokens == ("data-prep", "img2dataset", "mybot")
    disallowed = ("noai", "noindex")
    assert disallowing_directive([], tokens, disallowed) is None
    assert disallowing_directive(["nofollow, noarchive"], tokens, disallowed) is None
    assert disallowing_directive(["googlebot: noindex"], tokens, disallowed) is None
    assert disallowing_directive(["MyBot: NoIndex"], tokens, disallowed) == "noindex (X-Robots-Tag: MyBot: NoIndex)"
    assert disallowing_directive(["img2dataset: noai"], tokens, disallowed).startswith("noai ")
    assert disallowing_directive(["nofollow", " noai "], tokens, disallowed).startswith("noai ")
    assert disallowing_directive(["noai"], tokens, ()) is None
    assert parse_directive_list(" noai, NoImageAI ,,") == ("noai", "noimageai")
    assert parse_directive_list("") == ()


def test_bad_directive_list_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"]}), tmp_path / "t.parquet")
    code = main(["image-text", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "out"),
                 "--caption-col", "caption", "--url-col", "url", "--disallowed-header-directives", "bot: noai"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--disallowed-header-directives" in err


# ---- data-prep stats -------------------------------------------------------------------------------

def _md_tables(text: str) -> dict[str, dict[str, list[str]]]:
    """report.md's tables by the heading above them: first cell -> the other cells."""
    tables: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tables.setdefault(heading, {})[cells[0]] = cells[1:]
    return tables


def _lower_percentiles(values: list[float]) -> list[int]:
    ordered = sorted(values)
    return [int(ordered[int(q / 100 * (len(ordered) - 1))]) for q in (0, 5, 25, 50, 75, 95, 100)]


def _caption_table(tmp_path: Path) -> Path:
    """Bytes rows: sizes that vary, one repeated image, one corrupt image, one blank and one Cyrillic caption."""
    images = [_jpeg((i * 30 % 256, 10, 10), (20 + 3 * i, 16 + i)) for i in range(9)]
    images += [images[2], b"not an image"]
    captions = [f"photo {'word ' * i}" for i in range(9)] + ["a repeat", "x"]
    captions[4], captions[6] = "   ", "фото кота"
    pq.write_table(pa.table({"img": images, "cap": captions}), tmp_path / "c.parquet")
    return tmp_path / "c.parquet"


def test_stats_report_matches_the_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["image-text", "--input", str(_caption_table(tmp_path)), "--output", str(out),
                 "--caption-col", "cap", "--bytes-col", "img", "--image-size", "12", "--shard-size", "4",
                 "--no-progress", "--dedup"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("report.md", "report.html", "image_sizes.png", "caption_length.png",
                 "rejects_by_partition.png", "rejects_by_source.png"):
        assert (out / "stats" / name).stat().st_size > 0, name  # written by the job itself
    (out / "stats" / "report.md").unlink()
    assert main(["stats", str(tmp_path)]) == 0  # a parent folder: every dataset below it
    tables = _md_tables((out / "stats" / "report.md").read_text())

    rows = tables["Rows"]
    assert rows["input rows"][0] == str(manifest["num_input_rows"]) == "11"
    assert rows["samples written"][0] == str(manifest["num_samples"])
    assert rows["rejected"][0] == str(sum(manifest["rejected"].values()))
    assert manifest["rejected"] == {"duplicate_image": 1, "empty_caption": 1, "not_an_image": 1}
    reasons = {k: int(v[0]) for k, v in tables["Rejected rows by reason"].items() if k != "reason"}
    assert reasons == manifest["rejected"]

    ok = [r for r in _stats_rows(out) if r["status"] == "ok"]
    sizes = tables["Image sizes (written samples, pixels)"]
    for label, column in (("original width", "original_width"), ("original height", "original_height"),
                          ("stored width", "width"), ("stored height", "height")):
        assert [int(v) for v in sizes[label][:7]] == _lower_percentiles([r[column] for r in ok]), label
        assert sizes[label][7] == str(len(ok)) == str(manifest["num_samples"])
    captions = tables["Captions (written samples)"]
    assert [int(v) for v in captions["characters"][:7]] == _lower_percentiles([len(r["caption"]) for r in ok])
    scripts = {k: int(v[0]) for k, v in tables["Captions (written samples)"].items() if k in ("Latin", "Cyrillic")}
    assert scripts == {"Latin": len(ok) - 1, "Cyrillic": 1}
    partitions = tables["Rejections over the job (by partition, in input order)"]
    assert sum(int(v[2]) for k, v in partitions.items() if k.isdigit()) == 3
    assert tables["Rejections by source (input file)"]["c.parquet"][:3] == ["11", str(len(ok)), "3"]
    assert tables["Duplicates"]["rejected as duplicate_image (--dedup)"] == ["1"]
    assert "CLIP score (written samples)" not in tables

    # A scoring step's clip_score column, when the stats files have one, gets its own section.
    scores: list[float] = []
    for path in sorted(out.glob("*.stats.parquet")):
        table = pq.read_table(path)
        column = [0.1 * (i + 1) if s == "ok" else None for i, s in enumerate(table.column("status").to_pylist())]
        scores += [v for v in column if v is not None]
        table = table.drop_columns([c for c in ("clip_score",) if c in table.column_names])  # null when unscored
        pq.write_table(table.append_column("clip_score", pa.array(column, pa.float64())), path)
    assert main(["stats", str(out)]) == 0
    clip = _md_tables((out / "stats" / "report.md").read_text())["CLIP score (written samples)"]["clip_score"]
    assert float(clip[0]) == pytest.approx(min(scores), abs=1e-4) and clip[7] == str(len(scores))
    assert (out / "stats" / "clip_score.png").is_file()


def test_stats_class_balance_and_no_report(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for name, count in (("cat", 6), ("dog", 3), ("fish", 1)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(_jpeg((i * 40, 0, 0), (24, 24)))
    assert main(["labelled", "--input", str(root), "--output", str(tmp_path / "quiet"), "--no-report",
                 "--no-progress", "--image-size", "8"]) == 0
    assert not (tmp_path / "quiet" / "stats").exists()
    assert main(["labelled", "--input", str(root), "--output", str(tmp_path / "out"), "--val-fraction", "0.3",
                 "--no-progress", "--image-size", "8"]) == 0
    for split in ("train", "val"):
        folder = tmp_path / "out" / split
        manifest = json.loads((folder / "manifest.json").read_text())
        classes = _md_tables((folder / "stats" / "report.md").read_text())["Classes (written samples)"]
        counted = Counter(r["label"] for r in _stats_rows(folder) if r["status"] == "ok")
        assert {k: int(v[1]) for k, v in classes.items() if k != "class"} == {
            name: counted.get(i, 0) for i, name in enumerate(manifest["classnames"])}
        assert (folder / "stats" / "classes.png").is_file()

    # Stats files written before the report existed lack the stored sizes, captions and labels: the report
    # says what they hold and leaves out what they do not.
    folder = tmp_path / "out" / "train"
    for path in folder.glob("*.stats.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["width", "height", "caption", "label"]), path)
    assert main(["stats", str(folder)]) == 0
    tables = _md_tables((folder / "stats" / "report.md").read_text())
    sizes = tables["Image sizes (written samples, pixels)"]
    assert "Classes (written samples)" not in tables and "stored width" not in sizes
    assert sizes["original width"][:7] == ["24"] * 7


def test_stats_of_a_dataset_in_a_bucket(tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))  # the bucket output's staging folder
    url = f"{s3_bucket}/corpus/ds"
    assert main(["image-text", "--input", str(_caption_table(tmp_path)), "--output", url, "--caption-col", "cap",
                 "--bytes-col", "img", "--image-size", "12", "--shard-size", "6", "--no-progress"]) == 0
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    inner = url.split("://", 1)[1]
    assert fs.isfile(f"{inner}/stats/report.md") and fs.isfile(f"{inner}/stats/image_sizes.png")  # the job's
    fs.rm(f"{inner}/stats", recursive=True)
    assert main(["stats", f"{s3_bucket}/corpus"]) == 0  # a folder above the dataset
    manifest = json.loads(fs.cat_file(f"{inner}/manifest.json"))
    rows = _md_tables(fs.cat_file(f"{inner}/stats/report.md").decode())["Rows"]
    assert rows["input rows"][0] == str(manifest["num_input_rows"]) == "11"
    assert rows["samples written"][0] == str(manifest["num_samples"])
    assert fs.isfile(f"{inner}/stats/report.html")
