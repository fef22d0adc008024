"""What precision a run computes in: `deepspeed.precision` resolved for the machine, and the one bf16
autocast context that training tasks (a distillation teacher's forward included), validation and
`launch eval` all enter."""
from __future__ import annotations

import contextlib

import torch


def resolve_precision(precision: str, on_gpu: bool) -> str:
    # bf16 with BatchNorm fails on CPU; autocast bf16 is the fast path on GPU.
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (GPU runs); plain fp32 otherwise, which CPU runs use."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
