"""`launch submit/status/logs/stop` against a real Ray head started with `ray start --head` on 127.0.0.1.

The head runs with token authentication (RAY_AUTH_MODE=token) in its own HOME, --temp-dir and ports, so it
never meets the session cluster of conftest.ray_session. It is torn down by killing its own processes (found
by its temp dir and GCS address), never with `ray stop`, which kills every Ray process on the machine.
tests/cluster_helpers.py starts it (test_two_node.py adds a second node to such a head).

Each CLI call runs in a subprocess with a clean environment (its own HOME, no RAY_* variables from this
process), as a user would run it: `python -m launch`, which imports only the command's module (launch/cli.py).
"""
from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from cluster_helpers import REPO, clean_env, free_port, local_cluster


@pytest.fixture(scope="module")
def head():
    with local_cluster(token=secrets.token_hex(32)) as cluster:
        yield cluster.client()


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_submit_waits_streams_logs_and_succeeds(head):
    out = head.ok("submit", "--address", head.address, "--", "--help")
    job = out.split("submitted job ", 1)[1].split()[0]
    assert f"launch logs {job} --follow --address {head.address}" in out
    assert "python -m launch --help" in out
    assert "usage: launch" in out  # the job's own output, streamed while waiting
    assert f"job {job} SUCCEEDED" in out
    assert head.wait_for(job, ("SUCCEEDED",)) == "SUCCEEDED"
    assert "usage: launch" in head.ok("logs", job, "--address", head.address)
    assert "usage: launch" in head.ok("logs", job, "--follow", "--address", head.address)
    assert job in head.ok("status", "--address", head.address)  # no JOB: the cluster's job list


def test_working_dir_upload_leaves_out_big_folders(head, tmp_path):
    for name in ("keep.py", "pipeline/data/reader.py", "data/shard.tar", "runs/x/metrics.jsonl", ".venv/bin/x",
                 ".git/HEAD", "pkg/__pycache__/m.pyc", "secret/key.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    listing = "import os; print(sorted(os.path.join(d, f) for d, _, fs in os.walk('.') for f in fs))"
    out = head.ok("submit", "--address", head.address, "--working-dir", str(tmp_path), "--exclude", "secret/",
                  "--no-wait", "--raw", "--job-id", "listing", "--", "python", "-c", listing)
    assert "submitted job listing" in out and "usage: launch" not in out
    assert head.wait_for("listing", ("SUCCEEDED", "FAILED")) == "SUCCEEDED"
    logs = head.ok("logs", "listing", "--address", head.address)
    assert "./keep.py" in logs and "./pipeline/data/reader.py" in logs
    for left_out in ("shard.tar", "metrics.jsonl", ".venv", ".git", ".pyc", "key.txt"):
        assert left_out not in logs, logs


def test_stop_a_running_job(head, tmp_path):
    head.ok("submit", "--address", head.address, "--working-dir", str(tmp_path), "--no-wait", "--raw",
            "--job-id", "sleeper", "--", "sleep", "600")
    assert head.wait_for("sleeper", ("RUNNING",)) == "RUNNING"
    assert "job sleeper STOPPED" in head.ok("stop", "sleeper", "--address", head.address)
    assert head.wait_for("sleeper", ("STOPPED",), timeout_seconds=5) == "STOPPED"
    assert "nothing to stop" in head.ok("stop", "sleeper", "--address", head.address)


def test_token_from_the_token_file_or_token_path(head):
    home = head.root / "home_with_token_file"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head.token + "\n")
    assert head.launch("status", "--address", head.address, home=home).returncode == 0
    path = head.root / "token_elsewhere"
    path.write_text(head.token)
    assert head.launch("status", "--address", head.address, RAY_AUTH_TOKEN_PATH=str(path)).returncode == 0


def test_submitting_without_or_with_a_wrong_token_fails_with_one_clear_line(head):
    argv = ("submit", "--address", head.address, "--no-wait", "--job-id", "refused", "--", "--help")
    for env in ({}, {"RAY_AUTH_MODE": "token"}):
        line = one_error_line(head.launch(*argv, **env))
        assert "requires a token" in line and "RAY_AUTH_TOKEN" in line and "~/.ray/auth_token" in line
    line = one_error_line(head.launch(*argv, RAY_AUTH_TOKEN="0" * 64))
    assert "rejected the token from RAY_AUTH_TOKEN" in line
    line = one_error_line(head.launch(*argv, RAY_AUTH_TOKEN_PATH=str(head.root / "missing")))
    assert "RAY_AUTH_TOKEN_PATH" in line and "missing or empty" in line
    assert "refused" not in head.ok("status", "--address", head.address)  # nothing was submitted


def test_unknown_job_is_one_clear_line(head):
    for command in ("status", "logs", "stop"):
        line = one_error_line(head.launch(command, "no_such_job", "--address", head.address,
                                          RAY_AUTH_TOKEN=head.token))
        assert "no job no_such_job" in line


def test_unreachable_address_is_one_clear_line(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([sys.executable, "-m", "launch", "submit", "--address", address, "--", "--help"],
                            cwd=REPO, env=clean_env(home), capture_output=True, text=True, timeout=60)
    assert "cannot reach the Ray dashboard at " + address in one_error_line(result)
    result = subprocess.run([sys.executable, "-m", "launch", "status", "x"], cwd=REPO, capture_output=True,
                            env=clean_env(home, RAY_ADDRESS=address), text=True, timeout=60)
    assert address in one_error_line(result)  # $RAY_ADDRESS is the default address


def test_full_cli_registers_the_cluster_commands():
    """As `launch` parses (launch/cli.py builds only the command's parser): submit still knows every command."""
    from launch.cli import build_parser
    from launch.submit import job_entrypoint

    def parse(argv: list[str]):
        return build_parser(argv).parse_args(argv)

    args = parse(["submit", "--address", "http://h:8265", "--", "pretrain", "--config", "configs/my run.yaml",
                  "--address", "ignored-by-submit"])
    assert args.address == "http://h:8265"
    assert job_entrypoint(args.command, args) == ("python -m launch pretrain --config 'configs/my run.yaml' "
                                                  "--address ignored-by-submit")
    assert job_entrypoint(["--", "eval", "zeroshot"], args) == "python -m launch eval zeroshot"
    for command, message in ((["--"], "nothing to submit"), (["--", "pretrian"], "unknown launch command"),
                             (["--", "status", "x"], "not a job to submit")):
        args = parse(["submit", *command])
        with pytest.raises(ValueError, match=message):
            job_entrypoint(args.command, args)
    for name in ("status", "logs", "stop"):
        assert parse([name, "j"]).job == "j"


def test_address_precedence(monkeypatch):
    from launch.submit import DEFAULT_DASHBOARD_ADDRESS, dashboard_address

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert dashboard_address(None) == DEFAULT_DASHBOARD_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert dashboard_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265/")
    assert dashboard_address(None) == "http://a:8265"
    assert dashboard_address("http://c:8265") == "http://c:8265"
