"""`run.profile_steps: [first, last]`: torch.profiler over those optimizer steps on rank 0.

Why: on one H200 our step ran at 0.88x (ZeRO-0) and 0.77x (ZeRO-1) of the plain PyTorch step, and
`model.compile` gained nothing under ZeRO-1 (benchmarks/RESULTS.md, GPU): the time goes outside the model,
so the question is which host-side work (DeepSpeed's engine, hooks, host syncs) sits between kernels. A
profile of the real loop answers it where a synthetic benchmark could miss the loader or our bookkeeping.

Writes into `<run>/profile/`:
  trace.json     Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev)
  top_ops.txt    operators by self CPU time, and by self device time on a GPU (torch's key_averages table)
  summary.json   steps, wall ms per step, host CPU ms per step, device-busy ms per step (GPU), and the
                 count of host-device synchronisations per step (cudaStreamSynchronize, cudaDeviceSynchronize,
                 device-to-host copies): each one stops the host from queueing the next kernels.
The profiled steps are slower than the others (the profiler's own cost): read throughput from other rows.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

PROFILE_DIR = "profile"
# Runtime calls that make the host wait for the device (a device-to-host copy waits for its stream).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
DEVICE_TO_HOST = "Memcpy DtoH"
TOP_OPS = 40


class StepProfiler:
    """Starts before step `first`, stops after step `last` (inclusive); a no-op for other steps."""

    def __init__(self, steps: tuple[int, ...], output_dir: Path, device: torch.device, enabled: bool):
        self.first, self.last = (steps[0], steps[1]) if steps and enabled else (0, -1)
        self.output_dir = Path(output_dir)
        self.device = device
        self._profiler: Optional[torch.profiler.profile] = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)  # earlier steps' queued kernels stay out of the window
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._started_s, self._cpu_started_s = time.perf_counter(), time.process_time()

    def after_step(self, step: int) -> None:
        if self._profiler is not None and step == self.last:
            self._write(step)

    def close(self, last_done_step: int, failing: bool = False) -> None:
        """The loop ended (finished, preempted, failed) after `last_done_step`: a window it cut short is
        written with the steps it profiled, rather than lost with the profiler. `failing`: the run's own
        exception is propagating, so a profile that cannot be written says why instead of raising (which
        would put the profiler's error in place of the run's)."""
        if self._profiler is None:
            return
        try:
            self._write(last_done_step, cut_short=True)
        except Exception as err:  # noqa: BLE001 - only while another exception is on its way out
            if not failing:
                raise
            print(f"[pretrain] profile not written to {self.output_dir}: {type(err).__name__}: {err}", flush=True)

    def _write(self, step: int, cut_short: bool = False) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_s, cpu_s = time.perf_counter() - self._started_s, time.process_time() - self._cpu_started_s
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        steps = step - self.first + 1
        if steps < 1:  # stopped inside the window's first step: nothing whole to report
            return
        write_profile(profiler, self.output_dir, steps, wall_s, cpu_s, on_gpu=self.device.type == "cuda")
        note = f" (the run stopped inside run.profile_steps {[self.first, self.last]})" if cut_short else ""
        print(f"[pretrain] profile of steps {self.first}-{step} written to {self.output_dir}{note}", flush=True)


def write_profile(profiler: torch.profiler.profile, output_dir: Path, steps: int, wall_s: float, cpu_s: float,
                  on_gpu: bool) -> dict:
    """trace.json, top_ops.txt and summary.json for `steps` profiled steps; returns the summary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(output_dir / "trace.json"))
    averages = profiler.key_averages()
    tables = [f"# by self CPU time, {steps} steps\n" + averages.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS)]
    if on_gpu:
        tables.append(f"# by self device time, {steps} steps\n"
                      + averages.table(sort_by="self_device_time_total", row_limit=TOP_OPS))
    (output_dir / "top_ops.txt").write_text("\n\n".join(tables) + "\n")
    counts = {event.key: event.count for event in averages}
    summary = {
        "steps": steps,
        "wall_ms_per_step": 1000 * wall_s / steps,
        "host_cpu_ms_per_step": 1000 * cpu_s / steps,
        "host_syncs_per_step": sum(counts.get(name, 0) for name in SYNC_EVENTS) / steps,
        "device_to_host_copies_per_step": sum(n for key, n in counts.items() if DEVICE_TO_HOST in key) / steps,
    }
    if on_gpu:
        # Kernel time summed over device events: wall minus this is where the GPU waited for the host.
        busy_us = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        summary["device_busy_ms_per_step"] = busy_us / 1000 / steps
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
