"""With no --address and no RAY_ADDRESS, `launch pretrain` and `data-prep --workers N` run on a private local
Ray, whatever else runs on the machine: another cluster started with `ray start --head`, or a stale session
pointer file (`ray_current_cluster` in Ray's temp folder) left by a cluster that was killed.

Each command runs as a user runs it: a subprocess of the CLI, with Ray's temp folder (RAY_TMPDIR) private
to the test so that neither the pointer file nor the other cluster meets anyone else's Ray on this machine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from cluster_helpers import REPO, clean_env, free_port, kill_cluster, local_cluster

SMOKE = str(REPO / "configs" / "smoke_resnet.yaml")
# What a run that attached to a foreign cluster, or whose Ray Train actors did, printed.
RAY_FAILURES = ("Traceback", "PlacementGroupCleaner", "Found multiple active Ray instances",
                "When connecting to an existing cluster")
# Ray Train's controller prints this traceback itself when its resource request is slow under CPU load, and
# says it is safe to ignore: no sign of a foreign cluster, so it is taken out of the run's log before the check.
_TRANSIENT_RESOURCE_REQUEST = re.compile(
    r"[^\n]*Failed to send resource request.*?ray\.exceptions\.GetTimeoutError[^\n]*", re.S)


@pytest.fixture(scope="module")
def other_cluster():
    """Someone else's cluster on this machine: `ray start --head` on its own port, its pointer file written
    into the temp folder our commands will look in (RAY_TMPDIR=<root>, so Ray's folder is <root>/ray)."""
    with local_cluster(token=None) as cluster:
        assert (Path(cluster.temp_dir) / "ray_current_cluster").is_file()  # `ray start` wrote its pointer
        yield cluster


@pytest.fixture
def stale_pointer():
    """A Ray temp folder whose pointer file names a cluster that is gone (nothing listens there)."""
    # Short and under /tmp: Ray's unix socket paths live under the temp folder and are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rstale", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    yield root
    _kill_private_clusters(root)
    shutil.rmtree(root, ignore_errors=True)


def _kill_private_clusters(root: Path) -> None:
    """Whatever Ray processes our commands left under this temp folder (none when they shut down cleanly)."""
    kill_cluster(str(root / "ray"), "no-such-address")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """A tiny ImageFolder tree: 2 classes x 4 images."""
    root = tmp_path_factory.mktemp("tree")
    for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
        (root / label).mkdir()
        for index in range(4):
            Image.new("RGB", (24, 20), tuple(c + index for c in colour)).save(root / label / f"{index}.jpg")
    return root


def _run(argv: list[str], ray_tmpdir: Path, home: Path, timeout: float) -> subprocess.CompletedProcess:
    # The user's environment with no RAY_ADDRESS (clean_env drops RAY_*), Ray's temp folder the test's, and
    # the user's JIT-built DeepSpeed ops (built afresh they cost ~25 s of gcc).
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    env = clean_env(home, RAY_TMPDIR=str(ray_tmpdir), TORCH_EXTENSIONS_DIR=extensions)
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _data_prep(image_tree: Path, out: Path, ray_tmpdir: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "data_prep.cli", "labelled", "--input", str(image_tree), "--output", str(out),
                 "--workers", "2", "--executor", "ray", "--shard-size", "2", "--image-size", "16",
                 "--no-progress"],
                ray_tmpdir, out.parent, timeout=240)


def _pretrain(digits_root: Path, out: Path, ray_tmpdir: Path) -> subprocess.CompletedProcess:
    values = {"run.output_dir": str(out), "run.name": "embedded", "data.train": f"{digits_root}/labelled/train",
              "data.val": "", "data.batch_size_per_rank": 8, "data.num_workers_per_rank": 0,
              "data.image_size_px": 16, "data.num_classes": 10, "model.name": "resnet_nano",
              "schedule.warmup_epochs": 0, "schedule.max_steps": 2, "checkpoint.every_steps": 0,
              "ray.num_workers": 1}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    return _run(["-m", "launch", "pretrain", "--config", SMOKE, *sets], ray_tmpdir, out.parent, timeout=480)


def _assert_clean(result: subprocess.CompletedProcess, run_log: Path | None = None) -> None:
    """Exit 0, and no sign of a foreign cluster in the console or (a run's) log of all that Ray printed."""
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-4000:]
    log = _TRANSIENT_RESOURCE_REQUEST.sub("", run_log.read_text()) if run_log else ""
    for where, text in (("console", console), (str(run_log), log)):
        found = [marker for marker in RAY_FAILURES if marker in text]
        assert not found, f"{found} in the {where}:\n{text[-6000:]}"


def _run_log(out: Path) -> Path:
    return out / "embedded" / "logs" / "output.log"  # launch/console.py RUN_LOG


def _jobs_on(cluster) -> str:
    """The jobs (drivers included) the other cluster has seen."""
    return cluster.python("import ray.util.state as s; "
                          f"print([j.job_id for j in s.list_jobs(address={cluster.dashboard!r})])").strip()


def test_data_prep_beside_another_running_cluster(other_cluster, image_tree, tmp_path):
    before = _jobs_on(other_cluster)
    result = _data_prep(image_tree, tmp_path / "shards", Path(other_cluster.root))
    _assert_clean(result)
    assert sorted(p.name for p in (tmp_path / "shards").rglob("*.tar"))  # shards written
    assert _jobs_on(other_cluster) == before  # it never attached to the other cluster


def test_pretrain_beside_another_running_cluster(other_cluster, digits_root, tmp_path):
    before = _jobs_on(other_cluster)
    result = _pretrain(digits_root, tmp_path / "runs", Path(other_cluster.root))
    _assert_clean(result, _run_log(tmp_path / "runs"))
    assert "[launch] done: step 2" in result.stdout
    assert _jobs_on(other_cluster) == before


def test_data_prep_with_a_stale_session_pointer(stale_pointer, image_tree, tmp_path):
    _assert_clean(_data_prep(image_tree, tmp_path / "shards", stale_pointer))
    assert sorted(p.name for p in (tmp_path / "shards").rglob("*.tar"))


def test_pretrain_with_a_stale_session_pointer(stale_pointer, digits_root, tmp_path):
    result = _pretrain(digits_root, tmp_path / "runs", stale_pointer)
    _assert_clean(result, _run_log(tmp_path / "runs"))
    assert "[launch] done: step 2" in result.stdout
    # The console holds our lines; Ray Train's line per report and DeepSpeed's notices go to the run's log.
    console, log = result.stdout + result.stderr, _run_log(tmp_path / "runs").read_text()
    for noise in ("Reporting training result", "Setting accelerator to CPU"):
        assert noise in log and noise not in console, noise
    assert "[pretrain] 1 rank(s) on cpu" in console and "[pretrain] 1 rank(s) on cpu" in log
