"""Issue 12, data-prep half of "one-line errors on every path": every user mistake or interruption
ends in one `data-prep: error:` line naming the path and the problem, never a traceback; the
train/val split is exact; the stats of a tree name the file and the problem of each rejected row.
Each case runs the real CLI in a subprocess, as a user would."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "data_prep", *map(str, args)]


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _jpeg(colour: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (colour % 256, colour * 7 % 256, colour * 13 % 256)).save(
        out, format="JPEG")
    return out.getvalue()


def _tree(root: Path, per_class: int, classes: int = 2, size: int = 16) -> Path:
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"img{i:04d}.jpg").write_bytes(_jpeg(c * 1000 + i, size))
    return root


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and exactly one stderr line: `data-prep: error: ...` holding
    every needle."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("data-prep: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# 1. --output that cannot be a folder we write into: one line, before any work starts.

def test_output_that_is_a_file(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    target = tmp_path / "out.txt"
    target.write_text("not a folder\n")
    line = _one_error_line(_run("labelled", "--input", tree, "--output", target, "--no-progress"),
                           str(target))
    assert "not a folder" in line or "is a file" in line
    assert target.read_text() == "not a folder\n"


def test_output_under_a_file(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    line = _one_error_line(_run("labelled", "--input", tree, "--output", blocker / "sub" / "out",
                                "--no-progress"), str(blocker))
    assert "is a file" in line


def test_output_unwritable_under_proc(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    _one_error_line(_run("labelled", "--input", tree, "--output", "/proc/data-prep-test/out",
                         "--no-progress"), "/proc", "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder")
def test_output_unwritable_folder(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _one_error_line(_run("labelled", "--input", tree, "--output", locked / "out",
                             "--no-progress"), str(locked), "not writable")
    finally:
        locked.chmod(0o755)


# 2. Ctrl-C: one line saying how to resume, exit 130; rerunning the same command finishes the job.

def test_ctrl_c_says_how_to_resume_and_rerun_completes(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 300, size=320)
    out = tmp_path / "out"
    args = ("labelled", "--input", tree, "--output", out, "--shard-size", "10", "--threads", "1",
            "--image-size", "32", "--no-progress")
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.stats.parquet")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job never wrote its first shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "interrupted" in lines[0] and "same command" in lines[0] and "resume" in lines[0], lines[0]
    done = len(list(out.glob("*.stats.parquet")))
    assert done < 60, "the job finished before the interrupt: the test needs more rows"

    rerun = _run(*args)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 600
    assert f"{60 - done} partitions run" in rerun.stdout, rerun.stdout


# 3. A labelled --input that does not exist says so (not "a table input needs --path-col").

def test_labelled_missing_input(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tree"
    line = _one_error_line(_run("labelled", "--input", missing, "--output", tmp_path / "out"),
                           str(missing), "does not exist")
    assert "a table input needs" not in line


# 4. --bytes-col naming a string column stops at once, naming the column and its type.

def test_bytes_col_of_strings(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("img,caption\nabc,a cat\ndef,a dog\n")
    _one_error_line(_run("image-text", "--input", table, "--output", tmp_path / "out",
                         "--bytes-col", "img", "--caption-col", "caption", "--no-progress"),
                    "'img'", "string", str(table))
    assert not (tmp_path / "out").exists()


# 5. A header-only table: one line, no empty dataset.

def test_header_only_csv(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("path,caption\n")
    _one_error_line(_run("image-text", "--input", table, "--output", tmp_path / "out",
                         "--path-col", "path", "--caption-col", "caption", "--no-progress"),
                    str(table), "no rows")
    assert not (tmp_path / "out" / "manifest.json").exists()


# 6. --val-fraction is exact: round(n * f) rows go to val.

@pytest.mark.parametrize("seed", [0, 1])
def test_val_fraction_is_exact(tmp_path: Path, seed: int) -> None:
    tree = _tree(tmp_path / "tree", 50, classes=2, size=8)
    out = tmp_path / "out"
    result = _run("labelled", "--input", tree, "--output", out, "--val-fraction", "0.2",
                  "--seed", str(seed), "--no-progress")
    assert result.returncode == 0, result.stderr
    val = json.loads((out / "val" / "manifest.json").read_text())
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert (val["num_samples"], train["num_samples"]) == (20, 80)
    again = tmp_path / "again"
    assert _run("labelled", "--input", tree, "--output", again, "--val-fraction", "0.2",
                "--seed", str(seed), "--no-progress").returncode == 0
    assert _val_rows(again) == _val_rows(out)


def _val_rows(out: Path) -> list[int]:
    return sorted(r for f in (out / "val").glob("*.stats.parquet")
                  for r in pq.read_table(f).column("source_row").to_pylist())


# 7. The stats of a tree name the file and the problem of every rejected row.

def test_tree_stats_name_path_and_detail(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 3)
    (tree / "class0" / "junk.jpg").write_bytes(b"this is not an image")
    (tree / "class1" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    result = _run("labelled", "--input", tree, "--output", out, "--no-progress", "--min-image-size", "1")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(next(out.glob("*.stats.parquet")))
    assert "path" in table.column_names
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows["class0/junk.jpg"]["status"] == "not_an_image"
    assert rows["class1/empty.jpg"]["status"] == "empty_file"
    for row in rows.values():
        assert row["path"]
        if row["status"] != "ok":
            assert row["detail"], row
