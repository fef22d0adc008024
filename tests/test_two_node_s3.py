"""A two-node `launch submit -- pretrain` job whose run directory is in a bucket, with no shared file system.

The same local two-node Ray cluster as tests/test_two_node.py (one CPU per node, token auth, 127.0.0.1 only,
each node with its own HOME), and a real S3 API server (moto) for `run.output_dir`. Each node stages the run
in its own HOME (~/.cache/resclip), so a rank sees only the files its own node wrote: the test checks that
every checkpoint is complete in the bucket with both ranks' shards, that neither node's staging folder holds
the other rank's shard, and that a relaunch resumes from the bucket (each node downloads what it lacks).

About 3-5 minutes on a 2-core machine (two jobs of ~60-120 s each, mostly start-up).
"""
from __future__ import annotations

import json
import os
import secrets

import pytest

from cluster_helpers import local_cluster

RUN = "two_node_s3"


@pytest.fixture(scope="module")
def two_nodes_s3(s3_server):
    # Every node stages under its own HOME: a staging root shared through the environment would hide the point.
    os.environ.pop("RESCLIP_CACHE", None)
    with local_cluster(token=secrets.token_hex(32), num_cpus=1, resources={"node_a": 1}) as cluster:
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        yield cluster


def submit(cluster, job_id: str, overrides: dict) -> str:
    argv = ["submit", "--address", cluster.dashboard, "--job-id", job_id, "--",
            "pretrain", "--config", "configs/smoke_resnet.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    result = cluster.client().launch(*argv, timeout=600, RAY_AUTH_TOKEN=cluster.token)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and f"job {job_id} SUCCEEDED" in out, out[-6000:]
    return out


def test_two_nodes_checkpoint_to_a_bucket_and_resume_from_it(two_nodes_s3, digits_root, s3_bucket):
    from pipeline import storage
    from pipeline.run_mirror import complete_steps, listing, remote_steps
    from pipeline.storage import url_digest

    run_url = f"{s3_bucket}/runs/{RUN}"
    overrides = {
        "run.name": RUN, "run.output_dir": f"{s3_bucket}/runs", "model.name": "resnet_nano",
        "data.image_size_px": 16, "data.train": str(digits_root / "labelled" / "train"),
        "data.val": str(digits_root / "labelled" / "val"), "data.num_workers_per_rank": 0,
        "schedule.max_steps": 10, "checkpoint.every_steps": 5, "checkpoint.keep_last": 2,
        "ray.num_workers": 2, "ray.cpus_per_worker": 1, "ray.use_gpu": "false", "eval.at_end": "false",
    }
    out = submit(two_nodes_s3, RUN, overrides)
    assert "[pretrain] 2 rank(s) on cpu" in out and "step 10/10" in out, out[-6000:]

    steps = remote_steps(run_url)
    assert complete_steps(steps) == [5, 10]
    for step in (5, 10):
        meta = json.loads(storage.read_text(f"{run_url}/checkpoints/step_{step:08d}/meta.json"))
        assert meta["world_size"] == 2
        assert sorted(n for n in steps[step] if n.endswith("optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert json.loads(storage.read_text(f"{run_url}/final_metrics.json"))["step"] == 10
    assert "metrics.jsonl" in listing(run_url)

    # Nothing was shared: each node's staging folder holds its own rank's optimizer shard only.
    shards_by_node = []
    for home in sorted(two_nodes_s3.root.glob("node*_home")):
        staged = home / ".cache" / "resclip" / "runs" / url_digest(run_url) / RUN / "checkpoints" / "step_00000010"
        shards_by_node.append(sorted(p.name for p in staged.glob("zero_pp_rank_*_optim_states.pt")))
    assert sorted(shards_by_node) == [["zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                                      ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]], shards_by_node

    out = submit(two_nodes_s3, f"{RUN}_resumed", {**overrides, "schedule.max_steps": 15})
    assert f"resumed from {run_url}/checkpoints/step_00000010 at step 10" in out, out[-6000:]
    assert complete_steps(remote_steps(run_url)) == [10, 15]  # keep_last 2, applied in the bucket
