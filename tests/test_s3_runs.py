"""Run directories in a bucket (issue 14), against a real S3 API server on 127.0.0.1 (moto's server mode).

Training writes the run directory in a local staging folder and mirrors it to the bucket
(pipeline/run_mirror.py): checkpoints land there with meta.json last, a relaunch resumes from the bucket
(also on a machine whose staging folder is empty), SIGTERM's checkpoint reaches the bucket before the exit,
retention deletes there, and eval / export / report / pretrained weights read from it. `launch pretrain`
runs as a subprocess (real processes, real DeepSpeed), the data stays local.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import checkpoint, remote_refs, storage

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")
SMOKE_CLIP = str(REPO / "configs" / "smoke_clip.yaml")
EXIT_PREEMPTED, EXIT_DRILL = 75, 17


def tiny(output_dir: str, digits_root: Path, name: str, *, ray: bool, **extra) -> list[str]:
    values = {
        "run.output_dir": output_dir, "run.name": name, "run.log_every_steps": 1,
        "data.train": f"{digits_root}/labelled/train", "data.val": f"{digits_root}/labelled/val",
        "data.batch_size_per_rank": 16, "data.num_workers_per_rank": 1, "data.image_size_px": 16,
        "model.name": "resnet_nano", "optim.lr": 0.05, "schedule.warmup_epochs": 0, "schedule.max_steps": 24,
        "checkpoint.every_steps": 8, "checkpoint.keep_last": 2, "deepspeed.zero_stage": 2,
        "deepspeed.precision": "fp32", "eval.at_end": False, "ray.num_workers": 2 if ray else 1, **extra,
    }
    cmd = [sys.executable, "-m", "launch", "pretrain", "--config", SMOKE, *([] if ray else ["--no-ray"])]
    for key, value in values.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def env(cache: Path) -> dict:
    """The test server's AWS_* variables (set by the s3_server fixture) and this machine's staging root."""
    return {**os.environ, "RESCLIP_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def launch(cmd: list[str], cache: Path, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=timeout_s)


def objects(url: str) -> dict[str, dict]:
    from pipeline.run_mirror import listing

    return listing(url)


def complete_steps(run_url: str) -> list[int]:
    from pipeline.run_mirror import complete_steps as complete, remote_steps

    return complete(remote_steps(run_url))


def model_states(ckpt_url_or_dir: str) -> dict:
    data = storage.read_bytes(storage.join(ckpt_url_or_dir, checkpoint.MODEL_STATES_FILE))
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)["module"]  # our own file


@pytest.fixture(scope="module")
def bucket(s3_server):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("s3-runs-module")
    return "s3://s3-runs-module"


# -- the mirror's protocol, without training ------------------------------------------------------------


def _fake_checkpoint(run_dir: Path, step: int, world_size: int) -> tuple[Path, dict]:
    folder = checkpoint.checkpoints_root(run_dir) / checkpoint.step_tag(step)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "zero_stage": 2, "world_size": world_size, "complete": True}
    for name in checkpoint.expected_files(meta):
        (folder / name).write_bytes(os.urandom(64))
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    return folder, meta


def test_meta_json_goes_up_only_after_every_rank_uploaded_and_retention_applies_in_the_bucket(
        s3_bucket, tmp_path, monkeypatch):
    from pipeline.config import Config
    from pipeline.run_mirror import RunMirror

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    cfg = Config.from_dict({"data": {"train": "x"}, "run": {"output_dir": f"{s3_bucket}/runs", "name": "unit"},
                            "checkpoint": {"keep_last": 1}})
    assert cfg.run_url == f"{s3_bucket}/runs/unit" and cfg.run_dir.name == "unit"
    assert str(cfg.run_dir).startswith(str(tmp_path / "cache"))
    rank0, rank1 = RunMirror(cfg, 0, 2, 0), RunMirror(cfg, 1, 2, 1)  # two ranks, no process group: no collectives

    folder, meta = _fake_checkpoint(cfg.run_dir, 8, world_size=2)
    url = f"{cfg.run_url}/checkpoints/step_00000008"
    rank0.after_save(folder, meta)
    time.sleep(2.0)  # rank 0's files are up, rank 1's are not: the checkpoint must not look complete
    assert sorted(objects(url)) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    rank1.after_save(folder, meta)
    rank1.wait()
    deadline = time.time() + 20
    while checkpoint.META_FILE not in objects(url) and time.time() < deadline:
        time.sleep(0.2)  # rank 0 marks it complete by itself, without waiting for the next checkpoint
    assert checkpoint.META_FILE in objects(url)
    rank0.wait()
    assert complete_steps(cfg.run_url) == [8]

    # An upload a killed run left behind (no meta.json), then two more checkpoints with keep_last 1.
    storage.write_bytes(f"{cfg.run_url}/checkpoints/step_00000012/mp_rank_00_model_states.pt", b"partial")
    for step in (16, 24):
        for mirror in (rank0, rank1):
            mirror.before_save(step)
        folder, meta = _fake_checkpoint(cfg.run_dir, step, world_size=2)
        for mirror in (rank1, rank0):
            mirror.after_save(folder, meta)
    rank1.wait()
    rank0.wait()
    steps = sorted({name.split("/")[0] for name in objects(f"{cfg.run_url}/checkpoints")})
    assert steps == ["step_00000024"]  # 8 and 16 by retention, the leftover 12 as older than the newest
    # Staging keeps the newest checkpoint only (the bucket is the run's copy).
    assert sorted(p.name for p in checkpoint.checkpoints_root(cfg.run_dir).iterdir()) == ["step_00000016",
                                                                                         "step_00000024"]

    # A rank whose files never arrive: the wait at the next checkpoint (or the end) says so, instead of
    # leaving a checkpoint that looks complete.
    folder, meta = _fake_checkpoint(cfg.run_dir, 32, world_size=2)
    rank0.after_save(folder, meta)
    with pytest.raises(storage.StorageError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt never reached"):
        rank0.wait()
    assert checkpoint.META_FILE not in objects(f"{cfg.run_url}/checkpoints/step_00000032")


# -- training into the bucket ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_run(bucket, digits_root, tmp_path_factory):
    """A bucket run killed inside its step-16 checkpoint (fault drill), relaunched on a 'fresh machine' (empty
    staging), next to the same run uninterrupted on local disk."""
    tmp = tmp_path_factory.mktemp("s3_resume")
    out = f"{bucket}/runs"
    # The local reference run trains beside the killed one (independent runs, one core's worth each, mostly
    # start-up); the kill is the fault drill's, at a step, not a timer.
    with ThreadPoolExecutor(1) as pool:
        whole_run = pool.submit(launch, tiny(str(tmp / "local"), digits_root, "whole", ray=False), tmp / "cache_whole")
        killed = launch(tiny(out, digits_root, "tiny", ray=False, **{"run.inject_failure_at_step": 16,
                                                                     "run.inject_failure_in_checkpoint": True}),
                        tmp / "cache_a")
        whole = whole_run.result()
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    after_kill = (killed.returncode, complete_steps(f"{out}/tiny"), sorted(objects(f"{out}/tiny/checkpoints")))
    # A checkpoint whose upload a kill interrupted: shards in the bucket, no meta.json.
    storage.write_bytes(f"{out}/tiny/checkpoints/step_00000012/{checkpoint.MODEL_STATES_FILE}", b"cut short")
    resumed = launch(tiny(out, digits_root, "tiny", ray=False), tmp / "cache_b")
    return {"out": out, "run_url": f"{out}/tiny", "whole": tmp / "local" / "whole", "after_kill": after_kill,
            "killed": killed, "resumed": resumed, "tmp": tmp}


def test_checkpoints_land_in_the_bucket_and_a_fresh_machine_resumes_from_it(resumed_run):
    code, steps, names = resumed_run["after_kill"]
    assert code == EXIT_DRILL, resumed_run["killed"].stderr[-3000:]
    assert steps == [8]  # step 16's shards were written locally, never marked complete, never uploaded
    assert not any(name.startswith("step_00000016") for name in names)

    resumed, run_url = resumed_run["resumed"], resumed_run["run_url"]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from {run_url}/checkpoints/step_00000008 at step 8" in resumed.stdout
    assert f"run dir: {run_url}" in resumed.stdout

    # keep_last 2 in the bucket; the interrupted upload at 12 is gone too.
    files = objects(f"{run_url}/checkpoints")
    assert sorted({name.split("/")[0] for name in files}) == ["step_00000016", "step_00000024"]
    for step in ("step_00000016", "step_00000024"):
        own = {name.split("/")[1]: info for name, info in files.items() if name.startswith(step)}
        assert set(own) == {checkpoint.META_FILE, checkpoint.MODEL_STATES_FILE,
                            "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        # meta.json last: no file of the checkpoint is newer than its completeness mark
        assert all(own[checkpoint.META_FILE]["LastModified"] >= info["LastModified"] for info in own.values())

    record = objects(run_url)
    for name in ("config.yaml", "versions.json", "metrics.jsonl", "final_metrics.json"):
        assert name in record, sorted(record)
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in record)
    final = json.loads(storage.read_text(f"{run_url}/final_metrics.json"))
    assert final["step"] == 24 and final["checkpoint"] == f"{run_url}/checkpoints/step_00000024"
    rows = [json.loads(line) for line in storage.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 24  # the first launch's rows continue in the bucket

    # The pieced-together run ends with the uninterrupted run's weights, bit for bit.
    whole = model_states(str(resumed_run["whole"] / "checkpoints" / "step_00000024"))
    pieced = model_states(f"{run_url}/checkpoints/step_00000024")
    assert whole.keys() == pieced.keys() and all(whole[k].equal(pieced[k]) for k in whole)


def test_eval_export_and_report_read_the_bucket(resumed_run, digits_root, tmp_path, monkeypatch, capsys):
    from launch.cli import main

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    run_url, out = resumed_run["run_url"], resumed_run["out"]
    data = ["--data", f"{digits_root}/labelled", "--split", "val", "--workers", "0"]
    result_url = f"{run_url}/eval/digits_classify.json"
    assert main(["eval", "classify", "--checkpoint", run_url, *data, "--output", result_url]) == 0
    by_run = json.loads(capsys.readouterr().out)
    assert by_run["checkpoint_step"] == 24 and by_run["metrics"]["num_samples"] == 360
    assert json.loads(storage.read_text(result_url)) == by_run

    ckpt = f"{run_url}/checkpoints/step_00000016"
    export_url = f"{resumed_run['out'].rsplit('/', 1)[0]}/exports/tiny.safetensors"
    assert main(["export", "--checkpoint", ckpt, "--format", "safetensors", "--output", export_url]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["files"] == [export_url] and exported["step"] == 16 and storage.exists(export_url)
    assert main(["eval", "classify", "--checkpoint", export_url, *data]) == 0
    by_export = json.loads(capsys.readouterr().out)
    assert by_export["checkpoint_step"] == 16 and by_export["checkpoint_sha256"] == exported["content_sha256"]

    assert main(["report", run_url]) == 0
    assert f"{run_url}/report/report.html" in capsys.readouterr().out
    assert "classify" in storage.read_text(f"{run_url}/report/report.md")  # the eval result in the bucket, too

    assert main(["eval", "classify", "--checkpoint", f"{out}/no_such_run", *data]) == 2
    assert "no such checkpoint, run directory or weights file" in capsys.readouterr().err


def test_a_soup_reads_the_bucket_and_is_written_there(resumed_run, digits_root, tmp_path, monkeypatch, capsys):
    """`launch soup`: ingredients, held-out set and output all in the bucket; the soup evaluates from there,
    and a second soup into the same (now non-empty) URL is refused before any work."""
    from launch.cli import main

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    run_url = resumed_run["run_url"]
    base = run_url.rsplit("/", 1)[0]
    held_out = f"{base}/held_out"
    storage.upload(Path(digits_root) / "labelled" / "val", f"{held_out}/val")
    soup_url = f"{base}/soups/uniform"
    soup = ["soup", "--checkpoints", f"{run_url}/checkpoints/step_00000016", f"{run_url}/checkpoints/step_00000024",
            "--method", "uniform", "--data", held_out, "--split", "val", "--output", soup_url, "--workers", "0",
            "--device", "cpu"]
    assert main(soup) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["files"] and all(f.startswith(f"{soup_url}/") and storage.is_file(f) for f in record["files"])
    assert main(["eval", "classify", "--checkpoint", soup_url, "--data", held_out, "--split", "val",
                 "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint_sha256"] == record["content_sha256"]
    assert main(soup) == 2
    assert f"--output {soup_url}: exists and is not an empty folder" in capsys.readouterr().err


def test_follow_evaluates_a_bucket_run_and_writes_its_record_there(resumed_run, tmp_path, monkeypatch, capsys):
    """`launch eval --follow RUN_URL`: every complete checkpoint in the bucket evaluated once, the result JSONs
    and eval_follow.jsonl written in the bucket, and a second follower finds nothing left to do."""
    from launch.cli import main
    from pipeline.evaluation.follow import FOLLOW_LOG

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    run_url = resumed_run["run_url"]
    steps = complete_steps(run_url)
    argv = ["eval", "--follow", run_url, "--until-done", "--interval-s", "0.1"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluated_steps"] == steps
    rows = [json.loads(line) for line in storage.read_text(f"{run_url}/{FOLLOW_LOG}").splitlines()]
    assert [row["step"] for row in rows] == steps and all(row["eval/val/num_samples"] == 360 for row in rows)
    results = [name for name in storage.listdir(f"{run_url}/eval") if name.startswith("val__classification__")]
    assert len(results) == len(steps)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluated_steps"] == []
    assert len(storage.read_text(f"{run_url}/{FOLLOW_LOG}").splitlines()) == len(steps)


def test_sigterm_puts_the_preemption_checkpoint_in_the_bucket_before_the_exit(bucket, digits_root, tmp_path):
    from pipeline.storage import staging_dir

    out, cache, steps = f"{bucket}/preempt", tmp_path / "cache", 40
    run_url = f"{out}/preempted"
    cmd = tiny(out, digits_root, "preempted", ray=False, **{"schedule.max_steps": steps, "checkpoint.every_steps": 50})
    os.environ["RESCLIP_CACHE"] = str(cache)  # where this machine stages the run (to watch its progress)
    try:
        staged_metrics = staging_dir(run_url) / "metrics.jsonl"
    finally:
        os.environ.pop("RESCLIP_CACHE")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if staged_metrics.is_file() and len(staged_metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, output[-4000:]
    record = json.loads(storage.read_text(f"{run_url}/preempted.json"))
    stopped = record["step"]
    assert 5 <= stopped < steps and record["checkpoint"] == f"{run_url}/checkpoints/{checkpoint.step_tag(stopped)}"
    assert complete_steps(run_url) == [stopped]  # complete in the bucket before the launcher exited
    assert f"preempted at step {stopped}: complete checkpoint {record['checkpoint']}" in output
    rows = [json.loads(line) for line in storage.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    assert rows[-1]["step"] == stopped  # the run files went up with it

    resumed = launch(cmd, tmp_path / "cache_other_machine")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {record['checkpoint']} at step {stopped}" in resumed.stdout
    assert not storage.exists(f"{run_url}/preempted.json")
    rows = [json.loads(line) for line in storage.read_text(f"{run_url}/metrics.jsonl").splitlines()]
    assert rows[-1]["step"] == steps


def test_a_preemption_request_in_the_bucket_reaches_rank_0(s3_bucket, tmp_path):
    """The driver's request, for a rank 0 on another machine: written to the bucket, seen by rank 0's poller."""
    from pipeline.preemption import REMOTE_POLL_S, Preemption

    url = f"{s3_bucket}/runs/x/PREEMPT"
    watcher = Preemption(tmp_path, rank=0, world_size=1, remote_request=url)
    try:
        assert not watcher.agreed()
        storage.write_text(url, "preemption requested\n")
        deadline = time.time() + 10 * REMOTE_POLL_S
        while not watcher.agreed() and time.time() < deadline:
            time.sleep(0.1)
        assert watcher.agreed()
    finally:
        watcher.close()


def test_clip_run_checkpoints_to_the_bucket_and_zero_shot_reads_it(bucket, digits_root, tmp_path, monkeypatch,
                                                                    capsys):
    out = f"{bucket}/clip"
    overrides = {
        "run.output_dir": out, "run.name": "clip", "run.log_every_steps": 2,
        "data.train": f"{digits_root}/image_text/train", "data.val": "", "data.batch_size_per_rank": 32,
        "data.num_workers_per_rank": 1, "schedule.max_steps": 6, "schedule.warmup_epochs": 0,
        "checkpoint.every_steps": 3, "eval.every_steps": 0, "eval.at_end": False, "eval.zeroshot": "[]",
        "ray.num_workers": 1, "deepspeed.precision": "fp32",
    }
    cmd = [sys.executable, "-m", "launch", "pretrain", "--config", SMOKE_CLIP, "--no-ray"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    result = launch(cmd, tmp_path / "cache")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert complete_steps(f"{out}/clip") == [3, 6]

    from launch.cli import main

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "eval_cache"))
    assert main(["eval", "zeroshot", "--checkpoint", f"{out}/clip", "--data", f"{digits_root}/zeroshot",
                 "--workers", "0"]) == 0
    zero_shot = json.loads(capsys.readouterr().out)
    assert zero_shot["checkpoint_step"] == 6 and 0 <= zero_shot["metrics"]["acc1"] <= 1


# -- refused before any worker starts -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing_bucket", "dead_endpoint"])
def test_an_unreachable_output_bucket_is_one_line_in_preflight(where, s3_server, digits_root, tmp_path,
                                                               monkeypatch, capsys):
    from launch.cli import main
    from pipeline.trainer import free_port

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    url = "s3://no-such-bucket-here/runs"
    if where == "dead_endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        url = "s3://any-bucket/runs"
    started = time.time()
    assert main(tiny(url, digits_root, "refused", ray=False)[3:]) == 2  # from "pretrain" on
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(rf"run\.output_dir: cannot reach {re.escape(url)} \(.+\); check the bucket name", err), err
    assert time.time() - started < 60


def test_pretrained_weights_come_from_the_bucket(s3_bucket, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from pipeline.config import ConfigError
    from pipeline.tasks.contrastive import check_weights_file

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    url = f"{s3_bucket}/weights/w.safetensors"
    storage.upload(tmp_path / "w.safetensors", url)
    check_weights_file(url)
    assert remote_refs.load_weights_file(url)["w"].equal(state["w"])
    assert remote_refs.load_weights_file(url)["w"].equal(state["w"])  # the cached copy, still the same object
    with pytest.raises(ConfigError, match="model.pretrained_path: .*/weights/missing.pt: no such weights file"):
        check_weights_file(f"{s3_bucket}/weights/missing.pt")
