"""Runs the data-prep CLI in this process and prints the wall and main-thread CPU time of the driver's phases
(start-up, table read, the pool's work, the report), for benchmarks/RESULTS.md issue 16:

    PYTHONPATH=. .venv/bin/python benchmarks/data_prep_phases.py image-text --input URLS.parquet --output OUT ...

(the data-prep arguments as benchmarks/data_prep_vs_img2dataset.py passes them). Worker processes are not
timed here: their CPU is the process tree's total minus the driver's (printed last)."""
from __future__ import annotations

import atexit
import sys
import time
from typing import Callable

START_WALL_S, START_CPU_S = time.perf_counter(), time.thread_time()
PHASES: list[tuple[str, float, float]] = []  # (name, wall s, main-thread CPU s)


def timed(module: object, name: str) -> None:
    """Replace module.name by a wrapper that records its wall and CPU time on every call."""
    inner: Callable = getattr(module, name)

    def wrapper(*args, **kwargs):
        wall_s, cpu_s = time.perf_counter(), time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            PHASES.append((name, time.perf_counter() - wall_s, time.thread_time() - cpu_s))

    setattr(module, name, wrapper)


def main(argv: list[str]) -> int:
    from data_prep import cli

    wall_s, cpu_s = time.perf_counter(), time.thread_time()
    from data_prep import image_text, job, report
    PHASES.append(("imports (job, image_text, report)", time.perf_counter() - wall_s, time.thread_time() - cpu_s))
    timed(image_text, "load_sources")
    for name in ("_check_identity", "shuffle_rows", "plan_partitions", "_execute", "_finalize", "_import_report"):
        timed(job, name)
    for name in ("write_report", "collect", "report_blocks"):
        timed(report, name)
    sys.argv = ["data-prep", *argv]
    atexit.register(report_phases)  # main() without argv ends the process itself (pipeline.process_exit)
    return cli.main()  # no argv: what the `data-prep` command runs


def report_phases() -> None:
    PHASES.append(("whole command", time.perf_counter() - START_WALL_S, time.thread_time() - START_CPU_S))
    for name, wall, cpu in PHASES:
        print(f"{name:34s} wall {wall:6.3f} s  cpu {cpu:6.3f} s", file=sys.stderr)
    print(f"driver process CPU, all threads: {time.process_time():.3f} s", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
