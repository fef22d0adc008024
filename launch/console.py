"""A run's console: our lines on it, the libraries' chatter in the run's log.

While a run trains, its processes print much that is not ours: Ray Train logs every report ("Reporting
training result ..."), its controller warns about its PreemptionWatcher actor, DeepSpeed announces the
accelerator and its op builds, torch that no CUDA runtime is found, open_clip each step of building a model,
and evaluation draws progress bars. Inside `run_output(log_path)`, everything this process writes goes, in
full, to log_path: Python's stdout and stderr, the file descriptors below them (C++ and child processes), and
what Ray forwards from its workers and actors, which Ray prints through this process's sys.stdout/sys.stderr.
The console keeps only the lines that start with one of OUR_TAGS (after Ray's "(RayTrainWorker pid=N)"
prefix): the trainer's progress and results, the launcher's lines, warnings and errors.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

RUN_LOG = Path("logs") / "output.log"  # in the run dir: everything the run's processes printed
# How our own lines begin (pipeline/metrics.py, pipeline/trainer.py, launch/pretrain.py, pipeline/data/...).
OUR_TAGS = ("[launch]", "[pretrain", "[data]", "[eval", "error:", "warning:")
# Ray's prefix on a forwarded line: colours, then "(RayTrainWorker pid=123, ip=10.0.0.2) ".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\([^()]*pid=[^()]*\)\s*")
# Ray forwards a worker's last lines a moment after training returns: wait this long for quiet before the
# console is given back, so they still go to the log.
QUIET_S = 0.5
MAX_WAIT_S = 3.0


def is_ours(line: str) -> bool:
    text = _RAY_PREFIX.sub("", _ANSI.sub("", line)).lstrip()
    return text.startswith(OUR_TAGS)


class _Router(io.TextIOBase):
    """A text stream that writes every complete line to the log (without colours) and ours to the console
    too."""

    def __init__(self, log: TextIO, console: TextIO, lock: threading.Lock, last_write: list[float]):
        self._log, self._console, self._lock, self._last_write = log, console, lock, last_write
        self._partial = ""
        self.path = Path(log.name)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:  # whoever writes below Python writes to the log
        return self._log.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            self._last_write[0] = time.monotonic()
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._log.write(_ANSI.sub("", line) + "\n")
                if is_ours(line):
                    self._console.write(line + "\n")
            if lines:
                self._log.flush()
                self._console.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()
            self._console.flush()

    def close_line(self) -> None:
        if self._partial:
            self.write("\n")


def _console_copy(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """Where our lines go: a duplicate of fd when `stream` writes to it (fd is about to point at the log),
    else the stream itself (pytest's capture, a notebook). True when the copy is ours to close."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", encoding="utf-8", errors="replace", buffering=1), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False


@contextlib.contextmanager
def run_output(log_path: Path) -> Iterator[Path]:
    """Everything this process prints goes to log_path (appended); our lines reach the console as well. Inside
    another run_output, nothing changes: the outer one's log gets it all."""
    if isinstance(sys.stdout, _Router):
        yield sys.stdout.path
        return
    # Ray's deduplication holds a line repeated by several workers back for up to 5 s and prints it later,
    # maybe after this run's log is closed. With only our lines on the console there is nothing to
    # deduplicate, and the log keeps every line as written. (Read when Ray is first imported.)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    lock, last_write = threading.Lock(), [time.monotonic()]
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        out, close_out = _console_copy(sys.stdout, 1)
        err, close_err = _console_copy(sys.stderr, 2)
        saved_fds = [os.dup(1), os.dup(2)]
        saved_streams = sys.stdout, sys.stderr
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout, sys.stderr = _Router(log, out, lock, last_write), _Router(log, err, lock, last_write)
        try:
            yield log_path
        finally:
            _wait_for_forwarded_lines(last_write)
            for router in (sys.stdout, sys.stderr):
                if isinstance(router, _Router):
                    router.close_line()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            for stream, ours in ((out, close_out), (err, close_err)):
                stream.flush()
                if ours:
                    stream.close()


def _wait_for_forwarded_lines(last_write: list[float]) -> None:
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return
    start = time.monotonic()
    while time.monotonic() < start + MAX_WAIT_S and time.monotonic() - max(last_write[0], start) < QUIET_S:
        time.sleep(0.1)
