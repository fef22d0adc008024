"""data-prep's fast paths (issue 16, speed): the local process pool that `--workers N` uses without a
cluster gives the shards and manifest of an in-process run and of Ray tasks, resumes after the driver is
killed, survives a lost worker and honours --retry-failed; --resize-only-if-bigger keeps the original bytes
of images that already fit. URLs come from a loopback server started here."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
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
from data_prep.images import ImageOptions, process_image
from data_prep.job import JobOptions
from loopback_server import LoopbackServer, Response

REPO = Path(__file__).resolve().parent.parent


def _jpeg(index: int, size: tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (index * 20 % 256, index * 50 % 256, index * 90 % 256)).save(out, format="JPEG")
    return out.getvalue()


class _Server(LoopbackServer):
    """/img/N.jpg, /drip/N.jpg (0.25 s per image: jobs long enough to kill), /flaky/N.jpg (503 while broken)."""

    def __init__(self) -> None:
        self.broken = True
        super().__init__(self.respond)

    def respond(self, path: str) -> Response:
        kind, name = path.strip("/").split("/", 1)
        if kind == "drip":
            time.sleep(0.25)
        if kind == "flaky" and self.broken:
            return 503, b"", []
        return 200, _jpeg(int(name.split(".")[0])), []


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


def _table(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), path)
    return path


def _args(table: Path, out: Path, *extra: str) -> list[str]:
    return ["image-text", "--input", str(table), "--output", str(out), "--caption-col", "caption",
            "--url-col", "url", "--image-size", "16", "--no-progress", "--no-report", *extra]


def _files(folder: Path) -> dict[str, object]:
    """Shards, stats and manifest (less its creation time): what must not depend on where partitions ran."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                                if p.suffix in (".tar", ".parquet") or p.name == "sizes.json"}
    files["manifest.json"] = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items()
                              if k != "created_utc"}
    return files


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # auto: the local pool
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                if entry.name.isdigit() and int(fh.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_auto_executor_is_local_without_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not JobOptions(num_workers=4).uses_ray()
    assert JobOptions(num_workers=4, address="10.0.0.1:6379").uses_ray()
    assert JobOptions(num_workers=4, executor="ray").uses_ray()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert JobOptions(num_workers=4).uses_ray() and not JobOptions(executor="local").uses_ray()
    with pytest.raises(ValueError, match="--executor local"):
        JobOptions(executor="local", address="10.0.0.1:6379")


@pytest.mark.integration  # Ray tasks
def test_local_pool_writes_what_in_process_and_ray_write(tmp_path: Path, server: _Server,
                                                         ray_session: object) -> None:
    table = _table(tmp_path / "u.parquet", [f"{server.base}/img/{i % 9}.jpg" for i in range(14)])
    _run = lambda out, *extra: main(_args(table, tmp_path / out, "--shard-size", "3", *extra))  # noqa: E731
    assert _run("one") == 0
    assert _run("pool", "--workers", "2", "--executor", "local") == 0
    assert _run("ray", "--workers", "2", "--executor", "ray") == 0
    one = _files(tmp_path / "one")
    assert len([n for n in one if n.endswith(".tar")]) == 5
    assert _files(tmp_path / "pool") == one and _files(tmp_path / "ray") == one
    # --dedup: one registry shared by the pool's workers, so no image is written twice.
    assert _run("dedup", "--workers", "2", "--executor", "local", "--dedup") == 0
    manifest = (tmp_path / "dedup/manifest.json").read_text()
    assert '"num_samples": 9' in manifest and '"duplicate_image": 5' in manifest


def test_local_pool_retry_failed(tmp_path: Path, server: _Server) -> None:
    urls = [f"{server.base}/img/{i}.jpg" for i in range(4)] + [f"{server.base}/flaky/{i}.jpg" for i in (4, 5)]
    args = _args(_table(tmp_path / "f.parquet", urls), tmp_path / "out", "--shard-size", "2", "--retries", "0",
                 "--no-shuffle", "--workers", "2", "--executor", "local")
    server.broken = True
    assert main(args) == 0
    assert '"http_503": 2' in (tmp_path / "out/manifest.json").read_text()
    first = (tmp_path / "out/00000.tar").stat().st_mtime_ns
    server.broken, server.requests[:] = False, []
    assert main([*args, "--retry-failed"]) == 0
    assert sorted(server.requests) == ["/flaky/4.jpg", "/flaky/5.jpg"]
    assert '"num_samples": 6' in (tmp_path / "out/manifest.json").read_text()
    assert (tmp_path / "out/00000.tar").stat().st_mtime_ns == first  # complete partitions are not redone


@pytest.mark.integration  # data-prep subprocesses, one killed mid-job
def test_local_pool_resumes_after_the_driver_is_killed_and_survives_a_lost_worker(
        tmp_path: Path, server: _Server) -> None:
    table = _table(tmp_path / "d.parquet", [f"{server.base}/drip/{i % 12}.jpg" for i in range(16)])
    common = ("--shard-size", "2", "--threads", "1", "--no-shuffle")
    assert main(_args(table, tmp_path / "reference", *common)) == 0
    reference = _files(tmp_path / "reference")

    # The driver killed with SIGKILL: its workers notice and exit; a rerun does only what is left.
    args = _args(table, tmp_path / "out", *common, "--workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "out").glob("*.stats.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    done_before = len(list((tmp_path / "out").glob("*.stats.parquet")))
    assert len(workers) == 2 and 2 <= done_before < 8
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "pool workers outlived their killed driver"
    assert main(args) == 0
    assert _files(tmp_path / "out") == reference

    # One worker killed mid-job: the pool is replaced and the lost partitions run again.
    args = _args(table, tmp_path / "lost", *common, "--workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "lost/00000.stats.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(_children(proc.pid)[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "a worker process died" in stderr, stderr[-3000:]
    assert _files(tmp_path / "lost") == reference


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_resize_only_if_bigger_keeps_the_bytes_of_images_that_fit() -> None:
    small_jpeg, small_png, big = _jpeg(3, (40, 30)), _png((30, 50)), _jpeg(4, (160, 120))
    only_bigger = ImageOptions(32, "center-crop", resize_only_if_bigger=True)
    kept = process_image(small_jpeg, only_bigger)
    assert (kept.data, kept.ext, kept.width, kept.height) == (small_jpeg, "jpg", 40, 30)
    assert process_image(small_png, only_bigger).data == small_png
    resized = process_image(big, only_bigger)
    assert (resized.width, resized.height) == (32, 32)
    # Off by default: an image that fits is still resized (here enlarged), as before the option existed.
    default = process_image(small_jpeg, ImageOptions(32, "shorter"))
    assert (default.width, default.height) == (43, 32) and default.data != small_jpeg
    # A rotated image that fits is stored upright, re-encoded but not resized.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format="JPEG", exif=exif)
    upright = process_image(out.getvalue(), only_bigger)
    assert (upright.width, upright.height, upright.ext) == (30, 40, "jpg") and upright.data != out.getvalue()


def test_resize_only_if_bigger_on_the_command_line(tmp_path: Path, server: _Server) -> None:
    table = _table(tmp_path / "s.parquet", [f"{server.base}/img/{i}.jpg" for i in range(3)])
    assert main(_args(table, tmp_path / "out", "--image-size", "100", "--resize-only-if-bigger")) == 0
    with tarfile.open(tmp_path / "out/00000.tar") as tar:
        images = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert sorted(images) == sorted(_jpeg(i) for i in range(3))
    # The option is part of the job: resuming into this folder without it is refused (exit 2).
    assert main(_args(table, tmp_path / "out", "--image-size", "100")) == 2


def _run_the_command(tmp_path: Path, server: _Server, before: str) -> list[str]:
    """A 6-row `data-prep image-text` (2 workers, the report on) run as the command line runs it: main()
    without argv, in a fresh interpreter, `before` run first. Its stdout, split."""
    table = _table(tmp_path / "urls.parquet", [f"{server.base}/img/{i}.jpg" for i in range(6)])
    argv = ["data-prep", *_args(table, tmp_path / "out", "--workers", "2", "--shard-size", "3")]
    argv.remove("--no-report")
    script = f"import sys; from data_prep.cli import main; sys.argv = {argv!r}\n{before}\nmain()"
    result = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 6
    assert (tmp_path / "out" / "stats" / "report.md").is_file()
    return result.stdout.split()


def test_the_command_never_imports_pandas(tmp_path: Path, server: _Server) -> None:
    """pyarrow imports pandas (~0.3 CPU-s, 5% of a 2,000-row job) on its first array built from Python
    objects, only to ask whether they are pandas objects; the `data-prep` command tells it once that they
    never are. Workers and the report included."""
    before = "import atexit; atexit.register(lambda: print('pandas' in sys.modules))"  # main() exits itself
    assert _run_the_command(tmp_path, server, before=before)[-1] == "False"


def test_the_command_never_imports_urllib3(tmp_path: Path, server: _Server) -> None:
    """Direct downloads go through data_prep/http1.py; urllib3 (with http.client and the email package),
    ~50 ms of the command's serial start, is imported only when a proxy may apply or a URL is unusual."""
    before = "import atexit; atexit.register(lambda: print('urllib3' in sys.modules))"  # main() exits itself
    assert _run_the_command(tmp_path, server, before=before)[-1] == "False"


def test_the_command_skips_the_interpreter_teardown(tmp_path: Path, server: _Server) -> None:
    """Once the job is on disk the command exits at once: exit handlers run (Ray's shutdown, multiprocessing's
    clean-up), the teardown of every module and object (0.15-0.35 s) does not. The code still comes back."""
    before = ("import atexit; atexit.register(print, 'exit-handler-ran')\n"
              "class Torn:\n    def __del__(self): print('torn-down')\nKEPT = Torn()")
    out = _run_the_command(tmp_path, server, before=before)
    assert out[-1] == "exit-handler-ran" and "torn-down" not in out, out


def test_caption_script_of_ascii_captions_is_the_letter_count_answer() -> None:
    # corpus_stats.caption_script answers ASCII captions without counting letter by letter: the same
    # answer as the count over _SCRIPT_RANGES, for every ASCII character alone and in mixes.
    from collections import Counter

    from data_prep import corpus_stats

    def counted(text: str) -> str:
        counts: Counter = Counter()
        for char in text:
            if char.isalpha():
                counts[next((n for lo, hi, n in corpus_stats._SCRIPT_RANGES if lo <= ord(char) <= hi), "other")] += 1
        return counts.most_common(1)[0][0] if counts else "none"

    texts = [chr(c) for c in range(128)] + ["", "1234 -- 56", "a photo, crop 7", "\t\n", "Z9", "~_~ x"]
    for text in texts:
        assert corpus_stats.caption_script(text) == counted(text), repr(text)
    assert corpus_stats.caption_script("кот and a cat") == "Latin"  # not ASCII: counted as before
    assert corpus_stats.caption_script("кошка, cat") == "Cyrillic"


@pytest.mark.skipif(sys.platform != "linux", reason="the report forks only on Linux")
def test_report_plots_drawn_in_a_forked_child_are_the_serial_ones(tmp_path: Path, server: _Server,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # data_prep/report.py draws part of the plots in a forked child: the same files as all drawn here,
    # and a child that fails leaves its plots to this process.
    from data_prep import report, report_plots

    urls = [f"{server.base}/img/{i}.jpg" for i in range(6)] + [f"{server.base}/missing/1.jpg"]
    out = tmp_path / "out"
    assert main(_args(_table(tmp_path / "t.parquet", urls), out, "--shard-size", "3")) == 0
    monkeypatch.setattr(report, "_can_fork", lambda: True)  # also beside the test session's Ray

    def plots() -> dict[str, bytes]:
        shutil.rmtree(out / "stats", ignore_errors=True)
        report.write_report(out)
        return {p.name: p.read_bytes() for p in sorted((out / "stats").glob("*.png"))}

    forked = plots()
    assert set(forked) == {"image_sizes.png", "caption_length.png", "rejects_by_partition.png",
                           "rejects_by_source.png"}
    with monkeypatch.context() as patch:
        patch.setattr(report, "_can_fork", lambda: False)
        assert plots() == forked
    parent, real_draw = os.getpid(), report._draw

    def fails_in_the_child(module: object, calls: list) -> None:
        if os.getpid() != parent:
            (tmp_path / "child_failed").write_text(",".join(name for name, _, _ in calls))
            raise RuntimeError("a child that cannot draw")
        real_draw(module, calls)

    monkeypatch.setattr(report, "_draw", fails_in_the_child)
    assert plots() == forked
    assert (tmp_path / "child_failed").read_text()  # the child had plots to draw, and failed


def test_images_are_processed_at_most_one_per_core_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # data_prep/rows.py: a partition's threads read (download) in parallel, but no more of them decode,
    # resize and encode at once than the process has slots (one per core); a rejected image frees its slot.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from data_prep import rows
    from data_prep.images import RowRejected

    monkeypatch.setattr(rows, "_image_slots", threading.BoundedSemaphore(2))
    lock, busy, peak, reading = threading.Lock(), [0], [0], [0]
    real_read, real_process = rows.read_image_bytes, rows.process_image

    def read(*args: object) -> bytes:
        with lock:
            reading[0] += 1
            peak.append(-reading[0])  # negative entries: reads in flight
        time.sleep(0.02)
        with lock:
            reading[0] -= 1
        return real_read(*args)

    def process(raw: bytes, options: ImageOptions):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        try:
            time.sleep(0.02)
            return real_process(raw, options)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(rows, "read_image_bytes", read)
    monkeypatch.setattr(rows, "process_image", process)
    spec = rows.RowSpec("image_text", "img", "bytes", caption_col="cap")
    images = [b"not an image"] * 2 + [_jpeg(i) for i in range(10)]

    def build(i: int) -> object:
        try:
            return rows.build_sample(spec, {"img": images[i], "cap": "c"}, rows.RowContext("t", "/", i, f"k{i}"))
        except RowRejected as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        built = list(pool.map(build, range(len(images))))
    assert [type(b).__name__ for b in built] == ["RowRejected"] * 2 + ["BuiltRow"] * 10
    assert peak[0] == 2  # never more than the slots, and both used
    assert min(peak[1:]) < -2  # reads overlapped beyond the slots
    assert rows._image_slots.acquire(blocking=False) and rows._image_slots.acquire(blocking=False)
