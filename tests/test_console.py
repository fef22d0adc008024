"""launch/console.py: during a run the console shows our lines, the run's log everything (issue 13)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from launch.console import is_ours

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_our_lines_are_told_apart_behind_rays_prefix():
    assert is_ours("[pretrain    5.5s] step 20/264 | loss 2.286")
    assert is_ours("\x1b[36m(RayTrainWorker pid=31995)\x1b[0m [pretrain] 2 rank(s) on cpu")
    assert is_ours("(RayTrainWorker pid=7, ip=10.0.0.2) [data] unreadable shard a.tar: boom")
    assert is_ours("error: training failed: ValueError")
    assert not is_ours("\x1b[36m(RayTrainWorker pid=31995)\x1b[0m Reporting training result 2: TrainingReport(...)")
    assert not is_ours("[2026-12-01 01:53:32,600] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
                       "accelerator to CPU.")
    assert not is_ours("(TrainController pid=1) [2026-12-01 01:53:29,866 E 31850 31879] core_worker.cc:2465: "
                       "Actor with class name: 'PreemptionWatcher' ...")


def test_run_output_sends_everything_to_the_log_and_ours_to_the_console(tmp_path):
    log = tmp_path / "run" / "logs" / "output.log"
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys
        from launch.console import run_output
        print("before the run")
        with run_output({str(log)!r}):
            print("[pretrain] step 1/2 | loss 2.3", flush=True)
            print("Reporting training result 1: TrainingReport(...)")
            logging.getLogger("deepspeed").warning("Setting accelerator to CPU.")
            print("warning: a shard was short", file=sys.stderr)
            os.write(2, b"C++ says hello\\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
            print("[launch] done: step 2")
        print("after the run")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["before the run", "[pretrain] step 1/2 | loss 2.3", "[launch] done: step 2",
                                          "after the run"]
    assert result.stderr.splitlines() == ["warning: a shard was short"]
    written = log.read_text()
    for line in ("[pretrain] step 1/2", "Reporting training result 1", "Setting accelerator to CPU.",
                 "warning: a shard was short", "C++ says hello", "a child process", "[launch] done: step 2"):
        assert line in written
    assert "before the run" not in written and "after the run" not in written


def test_a_run_output_inside_another_keeps_the_outer_log(tmp_path):
    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    script = textwrap.dedent(f"""
        from launch.console import run_output
        with run_output({str(outer)!r}):
            with run_output({str(inner)!r}) as log:
                print("[launch] inside", log)
                print("noise")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[launch] inside {outer}\n"
    assert outer.read_text() == f"[launch] inside {outer}\nnoise\n" and not inner.exists()
