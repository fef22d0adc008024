"""Experiment trackers (run.trackers, pipeline/reporting/trackers.py) against the real components: a real
`mlflow server` on 127.0.0.1 (SQLite store) read back through MLflow's client, W&B in offline mode read back
from the `.wandb` log it writes, TensorBoard's event files; real training runs (`launch pretrain --no-ray`).

The unit tests at the top need none of them: the fan-out disables a tracker that fails and says so once.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.reporting.trackers import (TRACKER_CLASSES, TRACKERS_RECORD, Tracker, Trackers, flat_params,
                                         mlflow_key, scalars)
from test_compile import pretrain_no_ray

# ------------------------------------------------------------------ the fan-out (unit)


class Recording(Tracker):
    name = "recording"
    stores_artifacts = False  # log_run_record would write a report of this empty folder
    rows: list = []

    def start(self, run_dir, run_name, params, resume_id):
        Recording.rows = []
        return "rec-1"

    def log(self, step, metrics):
        Recording.rows.append((step, metrics))

    def close(self, outcome):
        Recording.rows.append(("closed", outcome))


class FailsAtStepTwo(Recording):
    name = "fails"
    calls = 0

    def start(self, run_dir, run_name, params, resume_id):
        FailsAtStepTwo.calls = 0
        return None

    def log(self, step, metrics):
        FailsAtStepTwo.calls += 1
        if step == 2:
            raise ConnectionError("server went away\nwith a second line")


class CannotStart(Recording):
    name = "unreachable"

    def start(self, run_dir, run_name, params, resume_id):
        raise ConnectionError("cannot connect to 127.0.0.1:9")


def test_the_registry_holds_the_trackers_the_config_accepts():
    assert tuple(TRACKER_CLASSES) == config_module.TRACKERS


def test_a_tracker_failing_in_log_is_disabled_with_one_warning(tmp_path, monkeypatch, capsys):
    for cls in (Recording, FailsAtStepTwo, CannotStart):
        monkeypatch.setitem(TRACKER_CLASSES, cls.name, cls)
    trackers = Trackers.start(["unreachable", "fails", "recording"], tmp_path, "unit", {}, {})
    assert capsys.readouterr().out == ("[pretrain] warning: tracker unreachable unavailable: ConnectionError: "
                                       "cannot connect to 127.0.0.1:9\n")
    assert sorted(trackers.started) == ["fails", "recording"] and trackers.ids == {"recording": "rec-1"}
    for step in (1, 2, 3, 4):
        trackers.log(step, {"train/loss": 1.0 / step, "checkpoint": "not a number"})
    trackers.finish("finished")
    out = capsys.readouterr().out
    assert out == ("[pretrain] warning: tracker fails disabled: logging step 2 failed: ConnectionError: "
                   "server went away with a second line\n")
    assert FailsAtStepTwo.calls == 2  # never called again after it failed
    assert Recording.rows == [(step, {"train/loss": 1.0 / step}) for step in (1, 2, 3, 4)] + [("closed", "finished")]


def test_rows_and_config_become_scalars_and_parameters():
    assert scalars({"train/loss": 0.5, "train/skipped_samples": {"corrupt image": 3}, "epoch": 1,
                    "preempted": True, "val/warnings": ["x"], "checkpoint": "runs/x"}) == {
        "train/loss": 0.5, "train/skipped_samples/corrupt image": 3, "epoch": 1}
    assert flat_params({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "eval": {"async": False}}) == {
        "optim.lr": 0.1, "optim.betas": [0.9, 0.99], "eval.async": False}


def test_metric_keys_pass_mlflows_own_validation():
    from mlflow.utils.validation import validate_param_and_metric_name

    keys = ["train/loss", "val/image_retrieval_recall@5", "val/zeroshot/imagenet-1k/acc1",
            "train/skipped_samples/corrupt image", "eval.async"]
    assert not validate_param_and_metric_name("val/image_retrieval_recall@5")  # why mlflow_key exists
    assert all(validate_param_and_metric_name(mlflow_key(key)) for key in keys)
    assert mlflow_key("val/zeroshot/imagenet-1k/acc1") == "val/zeroshot/imagenet-1k/acc1"  # '/' stays


# ------------------------------------------------------------------ real servers and runs

TRACKED = "run.trackers=[tensorboard, wandb, mlflow]"
FIRST_STEPS, RESUMED_STEPS = 3, 5  # pretrain_no_ray checkpoints every 3 steps: the relaunch resumes at 3


def free_port() -> int:
    from pipeline.trainer import free_port as free

    return free()


@pytest.fixture(scope="module")
def unreachable_run(digits_root, tmp_path_factory):
    """A run whose MLflow URI has nothing listening: started in the background, awaited by its test.

    Yields (the closed port, the run folder, the future of the finished subprocess)."""
    closed = free_port()  # nothing listens there
    out = tmp_path_factory.mktemp("unreachable")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed}"}
    with ThreadPoolExecutor(1) as pool:
        yield closed, out / "unreachable", pool.submit(
            pretrain_no_ray, out, digits_root, "unreachable", "run.trackers=[tensorboard, mlflow]",
            "schedule.max_steps=1", env=env)


@pytest.fixture(scope="module")
def mlflow_server(unreachable_run, tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite store, artifacts proxied into a folder).

    It asks for unreachable_run only to start it first: that run (one core's worth, mostly start-up) trains
    while this server starts, instead of after the tracked runs."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # its start (imports, the store's migrations) takes 10-30 s on a busy machine
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer: " + (root / "server.log").read_text()[-3000:])
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def tracker_env(mlflow_server, tmp_path_factory):
    """W&B offline with every folder of its own in tmp; MLflow's client pointed at the server."""
    wandb_root = tmp_path_factory.mktemp("wandb")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_root),
           "WANDB_DATA_DIR": str(wandb_root / "data"), "WANDB_CACHE_DIR": str(wandb_root / "cache"),
           "WANDB_CONFIG_DIR": str(wandb_root / "config"), "WANDB_SILENT": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield wandb_root


@pytest.fixture(scope="module")
def first_run(tracker_env, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    result = pretrain_no_ray(out, digits_root, "tracked", TRACKED, f"schedule.max_steps={FIRST_STEPS}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning" not in result.stdout, result.stdout
    return out / "tracked", json.loads((out / "tracked" / TRACKERS_RECORD).read_text())


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(row: dict) -> dict:
    return scalars({k: v for k, v in row.items() if k not in ("step", "time_utc")})


def mlflow_history(client, run_id: str, run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    keys = {key for row in rows(run_dir) for key in numbers(row)}
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, mlflow_key(key)))
            for key in keys}


def jsonl_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list] = {}
    for row in rows(run_dir):
        for key, value in numbers(row).items():
            history.setdefault(key, []).append((row["step"], value))
    return history


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (':W&B', magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length,
    kind: 1 full, 2 first, 3 middle, 4 last). wandb 0.31 ships no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    position, payload = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero-filled rest of the last block
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def wandb_run(wandb_root: Path, run_id: str, index: int) -> dict:
    """The index-th offline run folder of `run_id` (a resumed run writes a second one): its history rows by
    step, its config and the files of its artifacts."""
    folders = sorted(wandb_root.glob(f"wandb/offline-run-*-{run_id}"))
    (log,) = folders[index].glob("run-*.wandb")
    found: dict = {"history": {}, "config": {}, "artifacts": set()}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            found["history"][row["step"]] = {k: v for k, v in row.items() if not k.startswith("_") and k != "step"}
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            found["config"].update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "artifact":
            found["artifacts"] |= {entry.path for entry in record.artifact.manifest.contents}
    return found


@pytest.mark.integration
def test_a_tracked_run_holds_the_metrics_config_and_record_in_mlflow(first_run, mlflow_server):
    from mlflow import MlflowClient

    from pipeline.config import load_config

    run_dir, ids = first_run
    client = MlflowClient(mlflow_server)
    tracked = client.get_run(ids["mlflow"])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tracked"
    # Every number of every metrics.jsonl row, at its step, under the same key.
    assert mlflow_history(client, ids["mlflow"], run_dir) == jsonl_history(run_dir)
    assert [step for step, _ in jsonl_history(run_dir)["train/loss"]] == [1, 2, 3]
    # The resolved config, one parameter per field.
    resolved = flat_params(load_config(str(run_dir / "config.yaml"), []).to_dict())
    assert tracked.data.params == {key: "" if v is None else str(v) for key, v in resolved.items()}
    assert tracked.data.params["optim.lr"] == "0.05" and tracked.data.params["run.trackers"] == str(
        ("tensorboard", "wandb", "mlflow"))
    # The run's record as artifacts: final metrics, config and the report.
    top = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert {"final_metrics.json", "config.yaml", "report"} <= top, top
    assert {"report/report.md", "report/report.html", "report/loss.png"} <= {
        a.path for a in client.list_artifacts(ids["mlflow"], "report")}
    final = client.download_artifacts(ids["mlflow"], "final_metrics.json", str(run_dir.parent / "downloaded"))
    assert json.loads(Path(final).read_text()) == json.loads((run_dir / "final_metrics.json").read_text())


@pytest.mark.integration
def test_a_tracked_run_holds_the_metrics_and_config_in_wandbs_offline_log(first_run, tracker_env):
    run_dir, ids = first_run
    found = wandb_run(tracker_env, ids["wandb"], 0)
    expected = {row["step"]: numbers(row) for row in rows(run_dir)}
    assert found["history"] == {step: pytest.approx(row, rel=1e-12) for step, row in expected.items()}
    assert found["config"]["optim.lr"] == 0.05 and found["config"]["model.name"] == "resnet_nano"
    assert {"final_metrics.json", "config.yaml", "report/report.md"} <= found["artifacts"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the default tracker still writes


@pytest.mark.integration
def test_a_resumed_run_continues_the_same_tracked_runs(first_run, tracker_env, mlflow_server, digits_root):
    from mlflow import MlflowClient

    run_dir, ids = first_run
    result = pretrain_no_ray(run_dir.parent, digits_root, "tracked", TRACKED, f"schedule.max_steps={RESUMED_STEPS}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stdout, result.stdout
    assert json.loads((run_dir / TRACKERS_RECORD).read_text()) == ids
    client = MlflowClient(mlflow_server)
    assert [r.info.run_id for r in client.search_runs([client.get_run(ids["mlflow"]).info.experiment_id])] == [
        ids["mlflow"]]
    history = mlflow_history(client, ids["mlflow"], run_dir)
    assert history == jsonl_history(run_dir) and [s for s, _ in history["train/loss"]] == [1, 2, 3, 4, 5]
    tracked = client.get_run(ids["mlflow"])
    # MLflow params cannot change: the first launch's value stays, the relaunch's is a tag of the same name.
    assert tracked.data.params["schedule.max_steps"] == str(FIRST_STEPS)
    assert tracked.data.tags["schedule.max_steps"] == str(RESUMED_STEPS) and tracked.info.status == "FINISHED"
    # W&B: the same run id, a second offline folder holding the steps after the checkpoint.
    resumed = wandb_run(tracker_env, ids["wandb"], 1)
    assert sorted(resumed["history"]) == [4, 5] and resumed["config"]["schedule.max_steps"] == RESUMED_STEPS


@pytest.mark.integration
def test_an_unreachable_tracking_server_is_one_warning_and_the_run_finishes(unreachable_run):
    closed, run_dir, running = unreachable_run
    result = running.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "warning" in line]
    assert warnings == [f"[pretrain] warning: tracker mlflow unavailable: ConnectionError: cannot connect to "
                        f"127.0.0.1:{closed} ([Errno 111] Connection refused)"], result.stdout
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 1
    assert not (run_dir / TRACKERS_RECORD).exists()
