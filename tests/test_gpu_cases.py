"""The prepared GPU measurement (benchmarks/gpu.sh -> benchmarks/gpu_cases.py) checked on the CPU.

A GPU machine is lent to some sessions only, for minutes: the script must work the first time it runs
there. `--cpu-smoke` runs the same code paths with tiny models on the CPU: our loop (`launch pretrain
--no-ray` from real shards) and the plain PyTorch reference, each with `--profile` (torch.profiler over
warm steps), one JSON line per case.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration  # a training run in a subprocess


def run_case(out: Path, shards: Path, *args: str) -> dict:
    command = [sys.executable, "benchmarks/gpu_cases.py", "--out", str(out), "--shards", str(shards),
               "--cpu-smoke", "--profile", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text().splitlines()[-1])


def test_our_case_and_the_reference_run_and_profile_on_the_cpu(digits_root, tmp_path):
    out = tmp_path / "gpu.jsonl"
    shards = digits_root / "labelled" / "train"
    ours = run_case(out, shards, "--case", "resnet50_ours", "--batch", "16", "--steps", "24", "--workers", "1")
    assert "error" not in ours, ours.get("error")
    assert ours["samples_per_second"] > 0 and 0 <= ours["data_wait_fraction"] <= 1
    # Steps 12-15 profiled: the rows whose window holds them (20, 24) are left out of the figure (row 10 is in).
    assert ours["profile"]["steps"] == 4 and ours["profile"]["host_cpu_ms_per_step"] > 0
    profile = tmp_path / "profile_resnet50_ours"
    assert "aten::convolution_backward" in (profile / "top_ops.txt").read_text()
    assert (profile / "trace.json").is_file()

    reference = run_case(out, shards, "--case", "resnet50_torch", "--batch", "2", "--steps", "8")
    assert "error" not in reference, reference.get("error")
    assert reference["samples_per_second"] > 0 and reference["profile"]["steps"] == 4
    assert "aten::convolution_backward" in (tmp_path / "profile_resnet50_torch" / "top_ops.txt").read_text()


def test_the_eval_cases_run_both_sides_on_the_cpu(digits_root, tmp_path):
    """benchmarks/gpu_eval.py: `launch eval zeroshot` and CLIP_benchmark's loop restated, same random-init
    weights and shards, each in its own process; both score every sample, and the same top-1."""
    out = tmp_path / "gpu.jsonl"
    rows = []
    for side in ("ours", "reference"):
        command = [sys.executable, "benchmarks/gpu_eval.py", "--side", side, "--shards",
                   str(digits_root / "labelled" / "val"), "--out", str(out), "--classes", "10", "--batch", "64",
                   "--workers", "1", "--work", str(tmp_path / "work"), "--cpu-smoke"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows.append(json.loads(out.read_text().splitlines()[-1]))
    ours, reference = rows
    assert "error" not in ours and "error" not in reference, (ours.get("error"), reference.get("error"))
    assert ours["num_samples"] == reference["num_samples"] > 0 and ours["acc1"] == reference["acc1"]
    assert ours["images_per_second"] > 0 and reference["wall_seconds"] > reference["eval_seconds"] > 0
