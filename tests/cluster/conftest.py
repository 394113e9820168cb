"""A real multi-node Ray cluster on this machine, for the end-to-end `make train-cluster` tests.

Each node is its own `ray start --block` process group (head + workers), with explicit
--num-cpus, its own ports, token authentication (RAY_AUTH_MODE=token and a random token in
RAY_AUTH_TOKEN, so nothing is read from or written to ~/.ray), the dashboard / Jobs API on
127.0.0.1 and every address the test uses on 127.0.0.1. (Ray advertises the machine's own IP
for multi-node clusters even when given --node-ip-address 127.0.0.1, and its GCS/raylet bind
all interfaces; the token is what keeps other hosts out.)

Stopping: SIGTERM then SIGKILL to each node's process group, then any leftover process whose
environment carries this cluster's marker (Ray worker processes start their own sessions).
`ray stop` is never used: it would stop every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = "CAPSNET_TEST_CLUSTER"
NODE_PORT_FLAGS = [
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRayCluster:
    """Head + worker nodes as separate `ray start --block` processes on this machine."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.marker = uuid.uuid4().hex
        # Short path: Ray's unix sockets live under it and must stay under ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: self.marker,
            # job entrypoints run `python`: the one with this project's packages
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "CUDA_VISIBLE_DEVICES"):
            self.env.pop(key, None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.gcs_port = self.dashboard_port = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        # Two nodes on one machine must not share a fixed default port; worker ports are
        # random by default.
        ports = free_ports(len(NODE_PORT_FLAGS))
        port_args = [
            a for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True) for a in (flag, str(port))
        ]
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            self.temp_dir,
            "--num-gpus",
            "0",
            *port_args,
            *args,
        ]
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.nodes[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.temp_dir,
        )

    def start_head(self, num_cpus: int) -> None:
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--num-cpus",
                str(num_cpus),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(client_port),
            ],
        )

    def add_node(self, name: str, num_cpus: int) -> None:
        self._start(name, ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus)])

    def wait_for_nodes(self, alive: int, timeout: float = 120) -> None:
        """Block until the cluster reports `alive` live nodes (via the token-protected API)."""
        code = (
            "import sys\nfrom ray.util.state import list_nodes\n"
            f"n = list_nodes(address={self.dashboard!r}, filters=[('state', '=', 'ALIVE')])\n"
            "print(len(n))\n"
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: see {self.log_dir / name}.log")
            r = subprocess.run(
                [sys.executable, "-c", code],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            last = (r.stdout + r.stderr).strip()[-500:]
            if r.returncode == 0 and r.stdout.strip() == str(alive):
                return
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {alive} alive nodes: {last}")

    def kill_node(self, name: str) -> None:
        """Remove a node the hard way (like a preempted VM): SIGKILL its whole process group."""
        proc = self.nodes.pop(name)
        _kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def run(self, cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )

    def train_worker_nodes(self) -> set[str]:
        """Node ids that hosted a RayTrainWorker actor (alive or dead)."""
        code = (
            "from ray.util.state import list_actors\n"
            f"a = list_actors(address={self.dashboard!r}, detail=True, limit=1000,\n"
            "    filters=[('class_name', '=', 'RayTrainWorker')], raise_on_missing_output=False)\n"
            "print(' '.join(sorted({x.node_id for x in a})))\n"
        )
        r = self.run([sys.executable, "-c", code], timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        return set(r.stdout.split())

    def stop(self) -> None:
        for proc in self.nodes.values():
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self.nodes.clear()
        for _ in range(3):  # workers in their own sessions exit when their raylet dies
            left = marked_pids(self.marker)
            if not left:
                break
            time.sleep(2)
        for pid in marked_pids(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session logs and sockets


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # start_new_session: group id = leader pid
        os.killpg(proc.pid, sig)


def marked_pids(marker: str) -> list[int]:
    """Live processes (other than zombies) whose environment carries this cluster's marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head (1 CPU) + one worker node (1 CPU): 2 training workers must use both nodes."""
    if sys.platform != "linux":
        pytest.skip("the local multi-node cluster uses Linux process groups and /proc")
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray-nodes"))
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node("worker1", num_cpus=1)
        cluster.wait_for_nodes(alive=2)
        yield cluster
    finally:
        cluster.stop()
        leftover = marked_pids(cluster.marker)
        assert not leftover, f"processes of the test cluster survived: {leftover}"
