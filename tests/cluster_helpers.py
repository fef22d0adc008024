"""Real Ray clusters for the tests: `ray start --head` (and more nodes) on 127.0.0.1, apart from any other.

A cluster gets its own HOME, --temp-dir and ports, so it never meets the session cluster of
conftest.ray_session nor another test session's clusters on the same machine. It is torn down by killing its
own processes (found by its temp dir and GCS address), never with `ray stop`, which kills every Ray process on
the machine.

Every node of a cluster runs on this machine and shares the head's --temp-dir (and so its session dir): Ray
names each raylet's sockets apart (raylet, raylet.1, ...). Each node has its own ports, including its own
range of worker ports, so two raylets never hand a worker the same port.

Loopback only: every node runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes Ray bind and connect
to 127.0.0.1 only. With that setting `ray start --address` refuses to start a worker node ("Multi-node Ray
clusters are not supported on Windows and OSX"); with it unset (Ray's Linux default) the joined node binds
its raylet, dashboard agent and runtime-env agent on every interface and on the machine's outward address,
and `--address=127.0.0.1:PORT` is rewritten to that outward address, which the loopback-only GCS does not
answer. So a node joins through Ray's own `ray start` CLI (`ray.scripts.scripts.main`) run with that one
guard switched off (RAY_START_JOINING_ON_LOOPBACK below); everything else is Ray's ordinary worker-node start.

Each CLI call runs in a subprocess with a clean environment (its own HOME, no RAY_* variables from this
process), as a user would run it. The subprocess registers only launch.submit: the full `launch` imports
open_clip and scikit-learn (~7 s a call).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Worker ports (one per Ray worker process) come from a range per node. Ray's default, 10002-19999, is
# shared by every Ray instance on the machine (the session cluster, other test sessions); the tests' nodes
# take ranges of their own below the kernel's ephemeral ports (32768+), where free_port() never lands.
WORKER_PORT_SPAN = 200
# `ray start ARGS...` with only the CLI's "multi-node needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" guard lifted:
# services.py (address resolution, bind addresses) still reads the real constant (False: loopback).
RAY_START_JOINING_ON_LOOPBACK = (
    "import sys, types; import ray.scripts.scripts as cli; "
    "cli.ray_constants = types.SimpleNamespace(**{**vars(cli.ray_constants), 'ENABLE_RAY_CLUSTER': True}); "
    "sys.argv[0] = 'ray'; sys.exit(cli.main())")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(span: int = WORKER_PORT_SPAN) -> tuple[int, int]:
    """A range of `span` ports in 20000-32767 that nothing listens on right now."""
    for _ in range(50):
        low = random.randrange(20000, 32768 - span, span)
        try:
            for port in range(low, low + span):  # ~200 binds: a few milliseconds
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low, low + span - 1
    raise RuntimeError("no free worker port range in 20000-32767")


def clean_env(home: Path, **extra: str) -> dict:
    """This process's environment without Ray settings (the session cluster may have set RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def cluster_processes(temp_dir: str, gcs_address: str):
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if temp_dir in cmdline or f"--address={gcs_address}" in cmdline:
            found[proc.pid] = proc
            try:
                found.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_cluster(temp_dir: str, gcs_address: str) -> None:
    """Kill every process of one test cluster (all its nodes), and nothing else."""
    import psutil

    procs = cluster_processes(temp_dir, gcs_address)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    # gcs_server and raylet outlast SIGTERM by more than 10 s here; the head holds nothing worth a clean exit.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(running(proc) for proc in procs):
        time.sleep(0.2)
    for proc in filter(running, procs):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


kill_head = kill_cluster  # the name test_submit.py used first


def running(proc) -> bool:
    """Alive and not a zombie: a killed head's orphans may stay zombies when PID 1 does not reap them."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Head:
    """The `launch` CLI pointed at a test cluster's dashboard, with or without its token."""

    def __init__(self, root: Path, token: str | None, dashboard: str):
        self.root, self.token, self.address = root, token, dashboard

    def launch(self, *argv: str, home: Path | None = None, timeout: float = 120, cwd: Path = REPO,
               **env: str) -> subprocess.CompletedProcess:
        """`launch ARGV...` as a user runs it (`python -m launch` imports only the command's module)."""
        home = home or self.root / "client_home"
        home.mkdir(exist_ok=True)
        return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=cwd, env=clean_env(home, **env),
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *argv: str, **kwargs) -> str:
        if self.token:
            kwargs.setdefault("RAY_AUTH_TOKEN", self.token)
        result = self.launch(*argv, **kwargs)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def wait_for(self, job: str, states: tuple[str, ...], timeout_seconds: float = 90) -> str:
        deadline = time.monotonic() + timeout_seconds
        while True:
            out = self.ok("status", job, "--address", self.address)
            status = out.split("status:", 1)[1].split()[0]
            if status in states or time.monotonic() > deadline:
                return status
            time.sleep(1)


class LocalCluster:
    """A head started with `ray start --head` on 127.0.0.1, and nodes joined to it with `ray start --address`."""

    def __init__(self, root: Path, token: str | None):
        self.root, self.token = root, token
        self.temp_dir = str(root / "ray")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes = 0

    def env(self, home: Path, **extra: str) -> dict:
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} if self.token else {
            "RAY_AUTH_MODE": "disabled"}
        # Each node has a HOME of its own (Ray's token file lives there), but keeps the user's JIT-built
        # DeepSpeed ops: built afresh per node, they cost each Ray Train worker ~25 s of gcc (minutes on a
        # busy 2-core machine).
        extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
        return clean_env(home, **{"TORCH_EXTENSIONS_DIR": extensions, **auth, **extra})

    def _ray_start(self, *flags: str, num_cpus: int, resources: dict | None, join: bool = False) -> None:
        """One node: its own HOME and ports, on 127.0.0.1, in the cluster's temp dir."""
        home = self.root / f"node{self.nodes}_home"
        home.mkdir()
        self.nodes += 1
        low, high = free_port_range()
        ports = {"--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--min-worker-port": low, "--max-worker-port": high}
        ray = [sys.executable, "-c", RAY_START_JOINING_ON_LOOPBACK] if join else [str(VENV_BIN / "ray")]
        command = [*ray, "start", *flags, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        started = subprocess.run(command, env=self.env(home), capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

    def start_head(self, num_cpus: int = 1, resources: dict | None = None) -> None:
        self._ray_start("--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                        "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        f"--ray-client-server-port={free_port()}", num_cpus=num_cpus, resources=resources)

    def add_node(self, num_cpus: int = 1, resources: dict | None = None) -> None:
        """A second (third...) raylet on this machine, joined through the head's GCS address."""
        self._ray_start(f"--address={self.gcs_address}", num_cpus=num_cpus, resources=resources, join=True)

    def kill(self) -> None:
        kill_cluster(self.temp_dir, self.gcs_address)

    def client(self) -> Head:
        return Head(self.root, self.token, self.dashboard)

    def python(self, code: str, timeout: float = 60) -> str:
        """Run `code` in a clean process that may use Ray's state API on this cluster (with its token)."""
        home = self.root / "client_home"
        home.mkdir(exist_ok=True)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=self.env(home), capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout


@contextlib.contextmanager
def local_cluster(token: str | None, num_cpus: int = 1, resources: dict | None = None):
    """A started head (token auth when `token` is given); killed, with every node added, on exit."""
    # Short and under /tmp: Ray's unix socket paths live under --temp-dir and are limited to ~107 bytes.
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="rsub", dir="/tmp")), token)
    try:
        cluster.start_head(num_cpus=num_cpus, resources=resources)
        yield cluster
    finally:
        cluster.kill()
        shutil.rmtree(cluster.root, ignore_errors=True)
