"""`launch submit`, `status`, `logs`, `stop`: the same launch commands as Ray jobs on a cluster.

Talks to the head node's dashboard (Ray Jobs API, default port 8265) with ray.job_submission. With token
authentication (RAY_AUTH_MODE=token on the cluster) the token comes from RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order (Ray's own order). docs/cluster.md has the walk-through.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

from launch.revision import git_revision, revision_text

DEFAULT_DASHBOARD_ADDRESS = "http://127.0.0.1:8265"
# Environment variables Ray's job CLI reads, most specific first.
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Never uploaded with the working dir: environments, outputs, datasets, caches (gitignore syntax,
# relative to the working dir; a leading "/" anchors to its top, so pipeline/data/ still travels).
WORKING_DIR_EXCLUDES = (
    "/.git/", "/.venv/", "/venv/", "/runs/", "/data/", "/build/", "/dist/", "/wandb/",
    "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/", "/benchmarks/results/",
)
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_HELP = ("set RAY_AUTH_TOKEN, or write the token to ~/.ray/auth_token or to a file named by "
              "RAY_AUTH_TOKEN_PATH (on the head node, `ray get-auth-token` prints it)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("submit", help="run a launch command as a Ray job on a cluster",
                            description="Submit `launch COMMAND ...` as a Ray job, e.g. "
                                        "launch submit --address http://HEAD:8265 -- pretrain --config FILE")
    add_address(parser)
    parser.add_argument("--working-dir", default=".",
                        help="folder uploaded as the job's working dir (default: .); "
                             f"never uploaded: {' '.join(WORKING_DIR_EXCLUDES)}")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="another gitignore-style pattern not to upload (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job, e.g. NCCL_SOCKET_IFNAME=eth0 (repeatable)")
    parser.add_argument("--job-id", default=None, help="submission id (default: Ray picks raysubmit_...)")
    parser.add_argument("--python", default="python",
                        help="Python interpreter on the cluster that has this project's dependencies")
    parser.add_argument("--raw", action="store_true",
                        help="run COMMAND as given (e.g. a shell script) instead of `launch COMMAND`")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting; do not stream logs")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the launch command, e.g. -- pretrain --config configs/x.yaml")
    parser.set_defaults(func=run_submit)

    parser = sub.add_parser("status", help="state of a submitted job (no JOB: list the cluster's jobs)")
    add_address(parser)
    parser.add_argument("job", nargs="?", default=None, help="submission id printed by `launch submit`")
    parser.set_defaults(func=run_status)

    parser = sub.add_parser("logs", help="a submitted job's driver output")
    add_address(parser)
    parser.add_argument("job", help="submission id printed by `launch submit`")
    parser.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    parser.set_defaults(func=run_logs)

    parser = sub.add_parser("stop", help="stop a submitted job")
    add_address(parser)
    parser.add_argument("job", help="submission id printed by `launch submit`")
    parser.add_argument("--wait-seconds", type=float, default=30.0,
                        help="how long to wait for the job to reach STOPPED (0: do not wait)")
    parser.set_defaults(func=run_stop)


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                             f"$RAY_ADDRESS, else {DEFAULT_DASHBOARD_ADDRESS})")


def dashboard_address(explicit: str | None) -> str:
    """--address, else the environment Ray's own job CLI reads, else the local default."""
    if explicit:
        return explicit.rstrip("/")
    for name in ADDRESS_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name].rstrip("/")
    return DEFAULT_DASHBOARD_ADDRESS


def auth_token() -> tuple[str | None, str | None]:
    """(token, where it came from), using Ray's own loader so the lookup order matches the cluster's."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, None
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last call (tests, long sessions)
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None, None
        token = loader.get_raw_token(ignore_auth_mode=True).strip()
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} is missing or "
                         f"empty: {TOKEN_HELP}") from None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return token, "RAY_AUTH_TOKEN"
    return token, os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


class Cluster:
    """A JobSubmissionClient whose failures become one-line ValueErrors naming the address and the fix."""

    def __init__(self, address: str | None):
        self.address = dashboard_address(address)
        self.token, self.token_source = auth_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        quiet_ray_loggers()
        if self.token and "RAY_AUTH_MODE" not in os.environ:
            # As `ray status` does: a token on hand turns token mode on in this process, so that a GCS
            # address (RAY_ADDRESS=HEAD:6379, resolved to the dashboard through the GCS) gets it too.
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        with self.errors(), without_env(ADDRESS_ENV_VARS):
            # Ray's client prefers $RAY_ADDRESS over its argument; an explicit --address must win.
            from ray.job_submission import JobSubmissionClient

            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def errors(self, job: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            raise ValueError(self.auth_message(str(err))) from None
        except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise ValueError(f"cannot reach the Ray dashboard at {self.address}: is the head running, and is "
                             "this its dashboard address (http://HEAD:8265, `ray start --head "
                             "--dashboard-port`)?") from None
        except RuntimeError as err:
            text = str(err)
            if job and "does not exist" in text:
                raise ValueError(f"no job {job} on the cluster at {self.address} (`launch status` lists "
                                 "its jobs)") from None
            raise ValueError(f"the Ray dashboard at {self.address} answered: "
                             f"{' '.join(text.split())[:300]}") from None

    def auth_message(self, ray_message: str) -> str:
        if "Authentication failed" in ray_message or (self.token and "Authentication required" not in ray_message):
            return (f"the Ray cluster at {self.address} rejected the token from {self.token_source}: use the "
                    f"cluster's token ({TOKEN_HELP})")
        return (f"the Ray cluster at {self.address} requires a token (RAY_AUTH_MODE=token) and none was "
                f"found: {TOKEN_HELP}")

    def info(self, job: str):
        with self.errors(job):
            return self.client.get_job_info(job)


def quiet_ray_loggers() -> None:
    """Ray's client logs each packaging step at INFO (and its default excludes at WARNING): noise here."""
    import logging

    import ray.dashboard.modules.job.sdk  # noqa: F401  (it sets its own level on import)

    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk",
                 "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray._private.authentication.http_token_authentication",
                 "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def without_env(names: tuple[str, ...]):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_entrypoint(command: list[str], args: argparse.Namespace) -> str:
    """The shell command the job runs: `python -m launch COMMAND...` (or COMMAND itself with --raw)."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ValueError("nothing to submit: put the launch command after --, e.g. "
                         "launch submit --address http://HEAD:8265 -- pretrain --config configs/x.yaml")
    if args.raw:
        return shlex.join(command)
    name = command[0]
    if name in ("submit", "status", "logs", "stop"):
        raise ValueError(f"`launch {name}` talks to the cluster from your machine: it is not a job to submit")
    from launch.cli import COMMANDS  # every command, though only this module's parsers were built

    known = sorted(set(COMMANDS) - {"submit", "status", "logs", "stop"})
    if not name.startswith("-") and name not in known:
        raise ValueError(f"unknown launch command '{name}' after --: choose from {', '.join(known)} "
                         "(or pass --raw to run a command verbatim)")
    return shlex.join([args.python, "-m", "launch", *command])


def job_runtime_env(args: argparse.Namespace) -> dict:
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise ValueError(f"--working-dir {args.working_dir} is not a folder")
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    runtime_env = {"working_dir": str(working_dir), "excludes": [*WORKING_DIR_EXCLUDES, *args.exclude]}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def run_submit(args: argparse.Namespace) -> int:
    entrypoint = job_entrypoint(args.command, args)
    runtime_env = job_runtime_env(args)
    cluster = Cluster(args.address)
    # .git is not uploaded, so the job's metadata carries the working dir's commit.
    metadata = {"launch_command": entrypoint,
                "git_revision": revision_text(git_revision(runtime_env["working_dir"]))}
    print(f"[launch] uploading {runtime_env['working_dir']} (not {' '.join(runtime_env['excludes'])}, nor what "
          ".gitignore lists)", flush=True)
    with cluster.errors():
        job = cluster.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                        submission_id=args.job_id, metadata=metadata)
    where = "" if cluster.address == DEFAULT_DASHBOARD_ADDRESS else f" --address {cluster.address}"
    print(f"[launch] submitted job {job} to {cluster.address}: {entrypoint}", flush=True)
    print(f"[launch]   status: launch status {job}{where}\n[launch]   logs:   launch logs {job} --follow{where}\n"
          f"[launch]   stop:   launch stop {job}{where}", flush=True)
    if args.no_wait:
        return 0
    try:
        follow_logs(cluster, job)
    except KeyboardInterrupt:
        print(f"\n[launch] stopped following; job {job} keeps running (launch stop {job}{where})",
              file=sys.stderr)
        return 130
    return report_final(cluster, job)


def follow_logs(cluster: Cluster, job: str) -> None:
    async def stream() -> None:
        async for chunk in cluster.client.tail_job_logs(job):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with cluster.errors(job):
        asyncio.run(stream())


def report_final(cluster: Cluster, job: str) -> int:
    """After the log stream ends: wait briefly for the final state; 0 only for SUCCEEDED."""
    deadline = time.monotonic() + 30
    info = cluster.info(job)
    while str(info.status) not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
        info = cluster.info(job)
    # A failed job's message repeats the log tail just streamed: its first line is enough.
    message = (info.message or "").strip().splitlines()
    print(f"[launch] job {job} {info.status}" + (f": {message[0]}" if message else ""), flush=True)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def run_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.job is None:
        with cluster.errors():
            jobs = cluster.client.list_jobs()
        for info in sorted(jobs, key=lambda j: j.start_time or 0):
            print(f"{info.submission_id or info.job_id}  {info.status!s:<9}  {when(info.start_time)}  "
                  f"{info.entrypoint}")
        if not jobs:
            print(f"[launch] no jobs on {cluster.address}")
        return 0
    info = cluster.info(args.job)
    print(f"job:        {args.job}\nstatus:     {info.status}")
    if info.message:
        print(f"message:    {info.message}")
    print(f"entrypoint: {info.entrypoint}\nstarted:    {when(info.start_time)}")
    if info.end_time:
        print(f"ended:      {when(info.end_time)} ({(info.end_time - info.start_time) / 1000:.0f} s)")
    if (info.metadata or {}).get("git_revision"):
        print(f"revision:   {info.metadata['git_revision']}")
    return 0


def when(milliseconds: int | None) -> str:
    if not milliseconds:
        return "-"
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def run_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        cluster.info(args.job)  # an unknown id fails here with a clear line, not in the websocket
        try:
            follow_logs(cluster, args.job)
        except KeyboardInterrupt:
            return 130
        return 0 if str(cluster.info(args.job).status) != "FAILED" else 1
    with cluster.errors(args.job):
        sys.stdout.write(cluster.client.get_job_logs(args.job))
    sys.stdout.flush()
    return 0


def run_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors(args.job):
        stopping = cluster.client.stop_job(args.job)
    if not stopping:
        print(f"[launch] job {args.job} is not running ({cluster.info(args.job).status}): nothing to stop")
        return 0
    deadline = time.monotonic() + args.wait_seconds
    status = str(cluster.info(args.job).status)
    while status not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(cluster.info(args.job).status)
    print(f"[launch] job {args.job} {status if status in TERMINAL_STATES else 'stopping (' + status + ')'}")
    return 0
