"""Shared fixtures: one local Ray cluster for the whole session, kept on 127.0.0.1."""
from __future__ import annotations

import os

import pytest

# Must be set before Ray is imported anywhere: single-machine Ray binds to loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The digits sample corpus, written once per test session (a few seconds)."""
    from data_prep.samples.digits import write_digits_corpus

    root = tmp_path_factory.mktemp("digits")
    write_digits_corpus(root)
    return root
