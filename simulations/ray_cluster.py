"""Attach a simulation to a Ray cluster that is already running (`--ray-address HOST:PORT`).

Flower's simulation engine runs on Ray, and would start a private Ray instance sized to this
machine; here it joins the team's cluster instead and leaves it running afterwards (the engine's
`ray.shutdown()` only disconnects this driver). Every check happens before the engine starts, each
failure one line naming the address or the setting and the fix: the address must answer (a TCP
connect, 5 s), Ray must agree to connect (same Ray version on both sides), and the cluster must
have the CPUs and GPUs one virtual client asks for on at least one node.

The app's code reaches the workers through the cluster's shared install, not a Ray runtime
environment upload: every node runs the Python environment that has Confide and its pinned
libraries (torch, Opacus, Flower) installed at the same path, as `make setup` builds it (a shared
filesystem or the same image). Uploading it per run would mean shipping torch's gigabytes, or
letting each node resolve it again and drift from the versions the privacy accounting was tested
with. The workers get this driver's import path, as Flower's own engine gives them.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

CONNECT_SECONDS = 5.0


class RayClusterError(RuntimeError):
    """A cluster this simulation cannot use; the message names the address or setting and fix."""


@dataclass(frozen=True)
class ClusterShape:
    """What the attached cluster offers: per node, how many virtual clients fit at once."""

    address: str
    clients_per_node: tuple[int, ...]
    cpus: float
    gpus: float

    def line(self) -> str:
        fits = ", ".join(str(n) for n in self.clients_per_node)
        return (
            f"attached to the Ray cluster at {self.address}: {len(self.clients_per_node)} nodes, "
            f"{self.cpus:g} CPUs, {self.gpus:g} GPUs; clients at once per node: {fits}"
        )


def host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(
            f"--ray-address {address!r}: expected HOST:PORT of a Ray head node, e.g. "
            "127.0.0.1:6379 (the address `ray start --head` prints)"
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    host, port = host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayClusterError(
            f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with "
            f"`ray start --head --port {port}` or give the address its head node printed"
        ) from None


def clients_per_node(
    nodes: list[dict], cpus_per_client: float, gpus_per_client: float
) -> list[int]:
    """How many clients each live node fits at once, as Flower's actor pool counts them."""
    fits = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        fit = int(resources.get("CPU", 0) // cpus_per_client)
        if gpus_per_client > 0:
            fit = min(fit, int(resources.get("GPU", 0) // gpus_per_client))
        fits.append(fit)
    return fits


def _connect(address: str) -> None:
    import ray

    check_reachable(address)
    pythonpath = os.pathsep.join(sys.path)  # the cluster's shared install: see the module doc
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            logging_level="ERROR",
            log_to_driver=False,
        )
    except Exception as error:  # version mismatch, a port that is not Ray's, a refused session
        said = " ".join(str(error).split()) or type(error).__name__  # Ray's is several lines
        raise RayClusterError(
            f"--ray-address {address}: Ray would not connect ({said[:400]}); the cluster must run "
            f"Ray {ray.__version__}, the version installed here"
        ) from None


def attach(address: str, cpus_per_client: float, gpus_per_client: float) -> ClusterShape:
    """Connect this process to the cluster, once (Flower's engine then uses the connection as
    is); its shape, or RayClusterError before anything runs there."""
    import ray  # only when attaching: Ray takes seconds to import

    if not ray.is_initialized():
        _connect(address)
    fits = clients_per_node(ray.nodes(), cpus_per_client, gpus_per_client)
    totals = ray.cluster_resources()
    if not any(fits):
        ray.shutdown()
        raise RayClusterError(
            f"--ray-address {address}: no node of the cluster has cpus-per-client = "
            f"{cpus_per_client:g} CPUs and gpus-per-client = {gpus_per_client:g} GPUs free for "
            f"one client (the cluster has {totals.get('CPU', 0):g} CPUs and "
            f"{totals.get('GPU', 0):g} GPUs in all); lower them or add nodes"
        )
    return ClusterShape(address, tuple(fits), totals.get("CPU", 0.0), totals.get("GPU", 0.0))
