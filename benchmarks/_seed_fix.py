"""The per-sample seeding fix proposed for pipeline/data/stream.py, applied at run time for measurement.

`torch.manual_seed` seeds every device; with a CUDA build and CUDA not initialised (always so in
DataLoader workers) it queues a lazy CUDA seed and records `traceback.format_stack()` each call:
~110 us per sample on this CPU, more than the resize. The stream only draws CPU randomness, so seeding
`torch.default_generator` alone gives the same draws (bit-identical batches) at ~1 us.

    python benchmarks/_seed_fix.py benchmark-data --config ...    (= `launch benchmark-data ...` + the fix)
"""
from __future__ import annotations

import random
import sys

import numpy as np
import torch


def seed_sample_rng_cpu(seed: int, epoch: int, position: int) -> None:
    from pipeline.data.stream import _seed

    value = _seed(seed, epoch, position, 0x77)
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)


def apply() -> None:
    import pipeline.data.mixing as mixing
    import pipeline.data.stream as stream

    stream.seed_sample_rng = seed_sample_rng_cpu  # ResumableStream looks the name up per sample
    mixing.seed_sample_rng = seed_sample_rng_cpu


if __name__ == "__main__":
    sys.path.insert(0, ".")
    apply()
    from launch.cli import main

    sys.exit(main(sys.argv[1:]))
