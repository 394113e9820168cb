"""A local Ray run listens on 127.0.0.1 only: GCS, raylet, workers, dashboard and agents.

Before, about 20 sockets of a local run listened on all interfaces (Ray replaces
_node_ip_address="127.0.0.1" with the machine's routable address) and Prometheus metrics
answered on the external address without a token."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.ray


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP socket the given processes listen on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in pids:
            if f"pid={pid}," in line:
                found.append((fields[3], pid))
    return found


def descendants(root: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines()[1:]:
        pid, ppid = (int(x) for x in line.split())
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")
def test_embedded_ray_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from pipeline.train.trainer import init_ray

    init_ray(num_cpus=1)
    try:

        @ray.remote
        def ping() -> int:
            return os.getpid()

        ray.get(ping.remote())  # a worker process, with its own server socket
        sockets = listening(descendants(os.getpid()))
        assert sockets, "found no listening socket of this Ray instance"
        exposed = [
            (addr, pid)
            for addr, pid in sockets
            if not addr.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))
        ]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        ray.shutdown()
