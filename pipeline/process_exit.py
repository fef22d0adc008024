"""Ending a command-line process without the interpreter's teardown, once its work is on disk.

What a normal exit adds after the exit handlers is the teardown of every module and object: for data-prep
(matplotlib, pyarrow, the job's tables) 0.15-0.35 s of a 2,000-row job, for `launch eval` (torch, open_clip,
timm, the model) ~0.8 s of an ~8 s zero-shot command (benchmarks/RESULTS.md, issues 15 and 16). Only for
command lines: a caller of main(argv) in its own process keeps its interpreter.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def exit_without_teardown(code: int) -> None:
    """Run the exit handlers (Ray's shutdown, multiprocessing's clean-up of daemonic children, logging's
    flush, weakref finalizers registered with atexit), flush stdout and stderr, and end the process with
    `code`. Returns (and a normal exit follows) while a non-daemon thread is alive, to wait for it."""
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # what a normal exit runs; undocumented but public since Python 2
    with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to say
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
