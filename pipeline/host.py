"""What this machine gives the process, without importing torch (data-prep's workers read it too)."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a container's or taskset's
    limit), else every CPU."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
