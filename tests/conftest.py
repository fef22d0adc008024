"""Shared fixtures: one local Ray cluster for the whole session, kept on 127.0.0.1; the integration marker."""
from __future__ import annotations

import os

import pytest

# Must be set before Ray is imported anywhere: single-machine Ray binds to loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The `integration` marker (pyproject.toml) goes on every test that starts a Ray cluster, DeepSpeed engines,
# training runs in subprocesses, a server (moto S3, a Ray head) or multi-process gloo groups, so that
# `pytest -m "not integration"` (make test-fast) is the unit layer alone. A test is integration when it
# uses one of these fixtures (directly or through a fixture of its module) ...
INTEGRATION_FIXTURES = frozenset({"ray_session", "s3_server", "s3_bucket"})
# ... or lives in one of these files, each of which is about such runs throughout ...
INTEGRATION_FILES = frozenset({
    "test_clip_loss.py",  # two gloo ranks under Ray against one process
    "test_clip_train.py", "test_compile.py", "test_embedded_ray.py",
    "test_engine_precision.py",  # DeepSpeed engines in subprocesses
    "test_lamb_zero.py",  # two ZeRO ranks over gloo (mp.spawn)
    "test_preemption.py", "test_pretrain.py", "test_round_trips.py", "test_s3_data.py",
    "test_s3_runs.py", "test_submit.py", "test_training_paths.py", "test_two_node.py",
    "test_two_node_s3.py",
})
# ... or carries @pytest.mark.integration itself (a slow test in an otherwise fast file).


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_FILES or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (starting Ray costs seconds)."""
    import ray

    from launch.pretrain import start_private_ray

    if not ray.is_initialized():
        # What `launch pretrain` starts: private, and Ray Train's actors know its address even while other
        # Ray clusters (other test sessions) run on this machine.
        start_private_ray(num_cpus=4, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The digits sample corpus, written once per test session (a few seconds)."""
    from data_prep.samples.digits import write_digits_corpus

    root = tmp_path_factory.mktemp("digits")
    write_digits_corpus(root)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1, found through the standard AWS variables.

    Yields the endpoint URL. The variables are set in this process's environment, which subprocesses and
    the workers our launcher starts inherit (launch pretrain forwards them to Ray workers explicitly)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket per test: s3://<name>."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-bkt"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"
