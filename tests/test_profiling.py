"""pipeline.profiling.StepProfiler: a window the run cuts short (preempted, ended or failed inside
run.profile_steps) is written with the steps it profiled, not lost with the profiler."""
from __future__ import annotations

import json

import torch

from pipeline.profiling import StepProfiler


def _steps(profiler: StepProfiler, steps: range) -> None:
    model = torch.nn.Linear(8, 8)
    for step in steps:
        profiler.before_step(step)
        model(torch.randn(4, 8)).sum().backward()
        profiler.after_step(step)


def test_a_window_cut_short_is_written_with_its_profiled_steps(tmp_path):
    profiler = StepProfiler((2, 50), tmp_path / "profile", torch.device("cpu"), enabled=True)
    _steps(profiler, range(1, 5))  # the run stops after step 4 (preempted, or its last step)
    profiler.close(4)
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert summary["steps"] == 3  # steps 2, 3 and 4
    assert "aten::addmm" in (tmp_path / "profile" / "top_ops.txt").read_text()
    profiler.close(4)  # closing twice writes nothing new and does not fail


def test_a_finished_window_and_other_ranks_write_once(tmp_path):
    profiler = StepProfiler((1, 2), tmp_path / "done", torch.device("cpu"), enabled=True)
    _steps(profiler, range(1, 4))
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["steps"] == 2
    (tmp_path / "done" / "summary.json").unlink()
    profiler.close(3)
    assert not (tmp_path / "done" / "summary.json").exists()
    other_rank = StepProfiler((1, 2), tmp_path / "rank1", torch.device("cpu"), enabled=False)
    _steps(other_rank, range(1, 3))
    other_rank.close(2)
    assert not (tmp_path / "rank1").exists()


def test_a_failing_run_keeps_its_own_error_when_the_profile_cannot_be_written(tmp_path, capsys):
    """The trainer closes the profiler while the run's own exception propagates: a profile that cannot be
    written then prints why instead of raising, which would replace the run's error with the profiler's."""
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the profile folder should go")
    failing = StepProfiler((1, 50), blocked / "profile", torch.device("cpu"), enabled=True)
    _steps(failing, range(1, 3))
    failing.close(2, failing=True)
    assert "profile not written" in capsys.readouterr().out
    normal = StepProfiler((1, 50), blocked / "profile", torch.device("cpu"), enabled=True)
    _steps(normal, range(1, 3))
    try:
        normal.close(2)
    except OSError:
        pass
    else:
        raise AssertionError("a run that ends normally reports a profile it cannot write")
