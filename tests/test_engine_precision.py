"""Gradient reduction dtype under bf16 autocast (issue 11 §4), read off a real DeepSpeed engine.

DeepSpeed's torch_autocast mode tags Linear/Conv weights with a bf16 communication dtype, and ZeRO-1/2
then keep one gradient bucket per communication dtype: the bucket keys are the dtypes gradients are
pre-divided and all-reduced in. timm and open_clip (DDP + AMP) reduce fp32 gradients.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import deepspeed
    from pipeline.config import Config
    from pipeline.engine import deepspeed_config, initialize

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    stage, comm = int(sys.argv[1]), sys.argv[2]
    cfg = Config.from_dict({"data": {"train": "x"}, "deepspeed": {"zero_stage": stage, "precision": "bf16",
                                                                   "comm_dtype": comm}})
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
                                torch.nn.LayerNorm(5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = initialize(model, optimizer, None, deepspeed_config(cfg.deepspeed, cfg.optim, 4, on_gpu=False))
    from deepspeed.runtime.torch_autocast import get_comm_dtype
    params = {str(get_comm_dtype(p)) for p in engine.module.parameters()}
    buckets = sorted(str(k) for k in getattr(engine.optimizer, "ipg_buckets", {}))
    # One real step under autocast: the reduction path runs with these buckets.
    loss = engine(torch.randn(4, 3, 8, 8)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    print("RESULT", json.dumps({"params": sorted(params), "buckets": buckets}))
""")


def probe(tmp_path, stage: int, comm: str) -> dict:
    import json

    from pipeline.trainer import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script), str(stage), comm], capture_output=True, text=True,
                            env=env, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_reduces_gradients_in_fp32_by_default(tmp_path, stage):
    seen = probe(tmp_path, stage, "fp32")
    assert seen["params"] == ["torch.float32"]
    assert seen["buckets"] == ["torch.float32"]


def test_bf16_gradient_reduction_is_an_explicit_opt_in(tmp_path):
    seen = probe(tmp_path, 2, "bf16")
    assert "torch.bfloat16" in seen["buckets"]


def test_comm_dtype_is_validated():
    from pipeline.config import Config, ConfigError

    with pytest.raises(ConfigError, match="deepspeed.comm_dtype"):
        Config.from_dict({"data": {"train": "x"}, "deepspeed": {"comm_dtype": "fp16"}})
