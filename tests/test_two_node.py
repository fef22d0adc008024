"""A `launch submit -- pretrain` job that spans two Ray nodes, on one machine, on 127.0.0.1 only.

The cluster is real: `ray start --head --num-cpus=1 --resources='{"node_a": 1}'`, then a second node joined
with `ray start --address=127.0.0.1:<gcs port> --num-cpus=1 --resources='{"node_b": 1}'`, both with token
authentication, each with its own HOME and ports, sharing the head's --temp-dir (tests/cluster_helpers.py
says why the join lifts one CLI guard). A 2-worker x 1-CPU run cannot fit on either node alone, so Ray Train
puts one rank on each: the test checks that through Ray's state API (the two RayTrainWorker actors ran on
the node_a node and the node_b node), that the job SUCCEEDED and that the step-10 checkpoint is complete.
Both nodes write to one run.output_dir: on this machine a local folder, on a real cluster shared storage
(docs/multinode.md).

About 1.5-2.5 minutes on a 2-core machine: starting two nodes ~20 s, the job ~60-120 s (uploading the
working dir, the driver's imports, two workers importing torch and DeepSpeed; 10 steps take ~3 s).
"""
from __future__ import annotations

import json
import secrets
import time

import pytest

from cluster_helpers import cluster_processes, local_cluster

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")
RUN = "two_node"


@pytest.fixture(scope="module")
def two_nodes():
    with local_cluster(token=secrets.token_hex(32), num_cpus=1, resources={"node_a": 1}) as cluster:
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        yield cluster


def node_ids_by_resource(cluster) -> dict[str, str]:
    """{"node_a": node id, "node_b": node id} from the GCS, as `ray.nodes()` sees them."""
    out = cluster.python(
        "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
        "print(json.dumps([(n['NodeID'], n['Alive'], n['NodeManagerAddress'], n['Resources']) "
        "for n in ray.nodes()]))" % cluster.gcs_address)
    nodes = json.loads(out.strip().splitlines()[-1])
    assert all(alive and address == "127.0.0.1" for _, alive, address, _ in nodes), nodes
    found = {name: node_id for node_id, _, _, resources in nodes for name in ("node_a", "node_b")
             if name in resources}
    assert len(nodes) == 2 and len(set(found.values())) == 2, nodes
    return found


def train_workers(cluster) -> list[tuple[str, str]]:
    """(node id, runtime env) of every RayTrainWorker actor the cluster ran (dead ones too), via the dashboard."""
    out = cluster.python(
        "import json; from ray.util.state import list_actors; "
        f"actors = list_actors(address={cluster.dashboard!r}, filters=[('class_name', '=', 'RayTrainWorker')], "
        "detail=True, limit=100, raise_on_missing_output=False); "
        "print(json.dumps([(a.node_id, a.serialized_runtime_env) for a in actors]))")
    return [tuple(worker) for worker in json.loads(out.strip().splitlines()[-1])]


def outward_sockets(cluster) -> list:
    """The cluster's TCP/UDP sockets that use an address other than 127.0.0.1 (none, if all is well)."""
    sockets = []
    for proc in cluster_processes(cluster.temp_dir, cluster.gcs_address):
        try:
            sockets += [(proc.pid, proc.name(), c.laddr, c.raddr) for c in proc.net_connections(kind="inet")]
        except Exception:  # a worker that exited meanwhile
            continue
    assert sockets, "found none of the cluster's sockets"
    return [s for s in sockets if s[2].ip not in LOOPBACK or (s[3] and s[3].ip not in LOOPBACK)]


def test_two_nodes_on_loopback_only(two_nodes):
    nodes = node_ids_by_resource(two_nodes)
    assert set(nodes) == {"node_a", "node_b"}
    assert outward_sockets(two_nodes) == []


def test_pretrain_job_spans_both_nodes_and_checkpoints(two_nodes, digits_root, tmp_path):
    output_dir = tmp_path / "runs"  # both "nodes" see this folder: a shared file system on a real cluster
    overrides = {
        "run.name": RUN, "run.output_dir": str(output_dir),
        "model.name": "resnet_nano", "data.image_size_px": 16,
        "data.train": str(digits_root / "labelled" / "train"), "data.val": str(digits_root / "labelled" / "val"),
        "data.num_workers_per_rank": 0, "schedule.max_steps": 10, "checkpoint.every_steps": 5,
        "ray.num_workers": 2, "ray.cpus_per_worker": 1, "ray.use_gpu": "false",
    }
    # NCCL settings travel as on a GPU cluster (docs/multinode.md); gloo ignores them here.
    argv = ["submit", "--address", two_nodes.dashboard, "--job-id", RUN,
            "--env", "NCCL_SOCKET_IFNAME=lo", "--env", "NCCL_DEBUG=INFO", "--",
            "pretrain", "--config", "configs/smoke_resnet.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    client = two_nodes.client()
    # The full `launch` CLI: `submit --` must know `pretrain`.
    result = client.launch(*argv, timeout=480, RAY_AUTH_TOKEN=two_nodes.token)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert f"job {RUN} SUCCEEDED" in out, out[-6000:]
    assert "[pretrain] 2 rank(s) on cpu" in out and "step 10/10" in out, out[-6000:]
    assert client.wait_for(RUN, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_seconds=30) == "SUCCEEDED"

    nodes = node_ids_by_resource(two_nodes)
    workers = train_workers(two_nodes)
    assert sorted(node for node, _ in workers) == sorted(nodes.values()), (workers, nodes)  # a rank per node
    for _, runtime_env in workers:  # `submit --env` reached the workers on both nodes
        env_vars = json.loads(runtime_env).get("env_vars", {})
        assert env_vars.get("NCCL_SOCKET_IFNAME") == "lo" and env_vars.get("NCCL_DEBUG") == "INFO", runtime_env

    run_dir = output_dir / RUN
    for step in (5, 10):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        meta = json.loads((ckpt / "meta.json").read_text())  # meta.json: written last, marks it complete
        assert meta["world_size"] == 2, meta
        assert (ckpt / "mp_rank_00_model_states.pt").is_file()
        assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 10
    assert outward_sockets(two_nodes) == []  # the job's traffic stayed on 127.0.0.1 too


@pytest.fixture()
def two_nodes_to_drain():
    """Its own cluster: a drained node stays draining, which no other test should inherit."""
    with local_cluster(token=secrets.token_hex(32), num_cpus=1, resources={"node_a": 1}) as cluster:
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        yield cluster


def test_a_ray_drain_notice_becomes_a_checkpoint_at_that_step(two_nodes_to_drain, digits_root, tmp_path):
    """Ray's node drain notice (what a spot reclaim looks like to Ray) reaches the ranks through Ray Train's
    preemption watcher: every rank checkpoints the step it is at and the run stops as preempted (exit 75)."""
    two_nodes = two_nodes_to_drain
    run, output_dir = "drained", tmp_path / "runs"
    overrides = {
        "run.name": run, "run.output_dir": str(output_dir), "run.log_every_steps": 5,
        "model.name": "resnet_nano", "data.image_size_px": 16,
        "data.train": str(digits_root / "labelled" / "train"), "data.val": str(digits_root / "labelled" / "val"),
        "data.num_workers_per_rank": 0, "schedule.max_steps": 5000, "checkpoint.every_steps": 0,
        "eval.at_end": "false", "ray.num_workers": 2, "ray.cpus_per_worker": 1, "ray.use_gpu": "false",
    }
    argv = ["submit", "--address", two_nodes.dashboard, "--job-id", run, "--no-wait", "--",
            "pretrain", "--config", "configs/smoke_resnet.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    client = two_nodes.client()
    result = client.launch(*argv, timeout=120, RAY_AUTH_TOKEN=two_nodes.token)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = output_dir / run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # training, past step 5
        assert time.monotonic() < deadline, client.ok("logs", run, "--address", two_nodes.dashboard)[-4000:]
        time.sleep(1)
    drained_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    node_b = node_ids_by_resource(two_nodes)["node_b"]
    two_nodes.python(
        "import subprocess, sys; subprocess.run(['ray', 'drain-node', '--address', %r, '--node-id', %r, "
        "'--reason', 'DRAIN_NODE_REASON_PREEMPTION', '--reason-message', 'spot reclaim (test)', "
        "'--deadline-remaining-seconds', '300'], check=True)" % (two_nodes.gcs_address, node_b))
    assert client.wait_for(run, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_seconds=180) == "FAILED"
    logs = client.ok("logs", run, "--address", two_nodes.dashboard)
    assert "Ray drain notice: node(s) " + node_b in logs, logs[-4000:]
    record = json.loads((output_dir / run / "preempted.json").read_text())
    assert drained_at < record["step"] < 5000, (drained_at, record)
    meta = json.loads((output_dir / run / "checkpoints" / f"step_{record['step']:08d}" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2
