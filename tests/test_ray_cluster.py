"""`confide simulate --ray-address`: the clients run on a Ray cluster that was already running.

The real thing on 127.0.0.1: a head node and a second Ray node started with `ray start` (one CPU
each, so the two clients that run at once must sit on different nodes), the simulation joins,
trains, and leaves both nodes running; the test stops them. Bad addresses are refused in one line
within seconds, with nothing started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from common.processes import free_port
from simulations.ray_cluster import clients_per_node
from tests.local_ray_cluster import LocalCluster, actor_sessions, alive_nodes, local_ray_cluster
from tests.test_simulate_cli import confide


def test_an_address_nothing_answers_at_is_one_line_naming_it_and_fast(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = confide("simulate", "heart", "--ray-address", address, "--out", str(tmp_path))
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "ray start --head" in lines[0]
    assert not (tmp_path / "metrics.json").exists()


def test_an_address_without_a_port_says_what_to_give(tmp_path):
    result = confide("simulate", "heart", "--ray-address", "my-cluster", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "expected HOST:PORT" in result.stderr and "my-cluster" in result.stderr


def test_clients_per_node_counts_as_flowers_actor_pool_does():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 2.0}},
        {"Alive": False, "Resources": {"CPU": 64.0}},  # a node that left
    ]
    assert clients_per_node(nodes, 1.0, 0.0) == [4, 2]
    assert clients_per_node(nodes, 2.0, 0.25) == [2, 0]  # the GPU-less node fits none


@pytest.fixture
def two_node_cluster(tmp_path) -> Iterator[LocalCluster]:
    with local_ray_cluster(2, tmp_path) as cluster:
        yield cluster


class ActorWatch(threading.Thread):
    """The sessions (nodes) Flower's client actors ran in, looked up every 0.2 s until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sessions: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sessions |= actor_sessions("ClientAppActor")


@pytest.mark.slow
def test_a_simulation_runs_on_both_nodes_of_a_running_cluster_and_leaves_it_running(
    two_node_cluster, tmp_path
):
    address = two_node_cluster.address
    out = tmp_path / "run"
    watch = ActorWatch()
    watch.start()
    result = confide(
        "simulate", "heart", "--rounds", "2", "--ray-address", address, "--out", str(out),
        "--quiet", timeout=600,
    )  # fmt: skip
    watch.done.set()
    watch.join()
    assert result.returncode == 0, result.stderr[-3000:]
    # The clients ran in actors on both nodes, and nowhere else (no private Ray of its own).
    assert watch.sessions == set(two_node_cluster.node_sessions)
    shown = " ".join(result.stdout.split())  # the console wraps long lines
    # One CPU per node and one per client: the two clients that run at once are on two nodes.
    assert f"attached to the Ray cluster at {address}: 2 nodes" in shown
    assert "clients at once per node: 1, 1" in shown
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert len(metrics["rounds"][-1]["clients"]) == 4
    assert metrics["rounds"][-1]["accuracy"] > metrics["initial"]["accuracy"]
    assert alive_nodes(address) == 2  # the cluster is still there for the next run

    too_big = tmp_path / "too-big.toml"
    too_big.write_text(
        f'task = "heart"\n[resources]\ncpus-per-client = 4\nray-address = "{address}"\n'
    )
    refused = confide("simulate", str(too_big), "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "no node of the cluster has cpus-per-client = 4" in refused.stderr
    assert alive_nodes(address) == 2

    # Another Ray here than on the cluster: the real cluster's version check refuses this process
    # (its Ray version is patched before the CLI starts; no second Ray is installed to try).
    other_ray = (
        "import sys, ray._private.utils as u; real = u.compute_version_info;"
        "u.compute_version_info = lambda: ('2.0.0', real()[1]);"
        "from confide.cli import main; sys.argv[0] = 'confide'; main()"
    )
    started = time.monotonic()
    mismatch = subprocess.run(
        [sys.executable, "-c", other_ray, "simulate", "heart", "--ray-address", address,
         "--out", str(tmp_path / "mismatch")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert mismatch.returncode != 0
    lines = mismatch.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], mismatch.stderr[-2000:]
    assert "Version mismatch" in lines[0] and "Ray: 2.0.0" in lines[0]
    assert not (tmp_path / "mismatch" / "metrics.json").exists()
    assert alive_nodes(address) == 2
