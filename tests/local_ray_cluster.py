"""A real Ray cluster of one-CPU nodes on 127.0.0.1, started with `ray start` and stopped after:
for the `--ray-address` test and benchmark. Each node runs in its own session, so stopping it
stops its raylet, GCS and workers, and nothing else on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.processes import free_port

RAY = Path(sys.executable).parent / "ray"
NODE_OPTIONS = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                "--disable-usage-stats"]  # fmt: skip
START_SECONDS = 90


class ClusterDidNotStart(RuntimeError):
    pass


@dataclass
class LocalCluster:
    address: str
    node_sessions: list[int]  # one per node, head first


def actor_sessions(actor_class: str) -> set[int]:
    """The sessions of the Ray actor processes of `actor_class` running now. Every node of
    `local_ray_cluster` is its own session, its raylet's workers included, so the sessions say
    which nodes the actors run on."""
    sessions = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(f"ray::{actor_class}".encode()):
                sessions.add(os.getsid(int(entry.name)))
        except OSError:  # the process ended meanwhile
            continue
    return sessions


def alive_nodes(address: str) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(RAY), "start", *args, *NODE_OPTIONS],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(node: subprocess.Popen) -> None:
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)


def _wait_for(address: str, count: int, log: Path, deadline: float) -> None:
    while alive_nodes(address) < count:
        if time.monotonic() > deadline:
            raise ClusterDidNotStart(log.read_text()[-2000:])
        time.sleep(2)


@contextmanager
def local_ray_cluster(nodes: int, log_dir: Path) -> Iterator[LocalCluster]:
    """`nodes` one-CPU Ray nodes (the first the head), each in its own session."""
    address = f"127.0.0.1:{free_port()}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Unix sockets need a short path
    deadline = time.monotonic() + START_SECONDS
    head = ["--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", temp_dir,
            "--include-dashboard", "false"]  # fmt: skip
    started: list[subprocess.Popen] = []
    try:
        for number in range(nodes):
            log = log_dir / f"ray-node-{number}.log"
            started.append(_start_node(head if number == 0 else ["--address", address], log))
            _wait_for(address, number + 1, log, deadline)
        yield LocalCluster(address, [node.pid for node in started])
    finally:
        for node in reversed(started):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
