"""Run metrics: metrics.jsonl rows, TensorBoard scalars and a console progress line (rank 0 only)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_seconds = time.time()
        self._writer = None
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time; jsonl is the record
                self._writer = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._console(step, metrics)

    def _console(self, step: int, metrics: dict) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("epoch", "loss", "lr", "samples_per_second", "data_wait_fraction", "val_top1", "val_top5",
                    "val_ema_top1"):
            if key in metrics:
                value = metrics[key]
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        elapsed = time.time() - self.start_seconds
        print(f"[pretrain {elapsed:7.1f}s] " + " | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
