"""Our DeepSpeed engine never waits for the device inside a training step.

DeepSpeed's throughput timer is on and synchronized by default ("timers.throughput"): it calls
get_accelerator().synchronize() at the start of every forward and the end of every step, so on a GPU the
host cannot queue the next step's kernels while the device runs this one, and every step pays its Python and
launch time on top of its GPU time. Nothing reads that timer (steps_per_print is off), so the config turns it
off. Counted here on the CPU accelerator, whose synchronize is the same call site."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, sys
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from pipeline.config import Config
    from pipeline.engine import deepspeed_config, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    stage = int(sys.argv[1])
    cfg = Config.from_dict({"data": {"train": "x"}, "deepspeed": {"zero_stage": stage}})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = initialize(model, optimizer, None, deepspeed_config(cfg.deepspeed, cfg.optim, 4, on_gpu=False))
    accelerator = get_accelerator()
    calls = {"n": 0}
    real = accelerator.synchronize

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    accelerator.synchronize = counting
    for _ in range(6):  # DeepSpeed's timer starts synchronizing at its third step
        loss = engine(torch.randn(4, 3, 8, 8)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    print("RESULT", json.dumps({"synchronize_calls": calls["n"]}))
""")


@pytest.mark.parametrize("stage", [0, 1])
def test_six_training_steps_never_synchronize_the_device(tmp_path, stage):
    from pipeline.trainer import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script), str(stage)], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    assert json.loads(lines[-1][len("RESULT "):]) == {"synchronize_calls": 0}
