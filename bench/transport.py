"""What TLS costs a federation: per-round wall time and bytes on the wire, plaintext vs TLS.

    .venv/bin/python -m bench.transport                  # 2 and 10 clients (a few minutes)
    .venv/bin/python -m bench.transport --clients 2 --rounds 2

Both transports run the real deployment on 127.0.0.1: `confide coordinator` (SuperLink on loopback
behind nginx) and one `flower-supernode` per site, started the way `confide join` starts them. Only
the sites' hop differs: TLS with SuperNode authentication, or plaintext (`--insecure`, loopback
only). The sites dial a counting TCP relay in front of nginx, so "bytes on the wire" are what a
network would carry (TLS records and HTTP framing included), sampled at each round's end. Round
times are the ServerApp's own (train + evaluate), medians over rounds. The default heart model,
one local epoch; the bundled heart records split into one file per site.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import setup_line, write_section
from client.join import JoinSettings, Site, prepare_join, start_supernode
from common.certificates.issuing import init_certs
from common.processes import free_port
from common.schema import load_schema
from common.site_policy import SitePolicy
from common.tasks import BUNDLED_SCHEMAS, load_heart_rows
from server.coordinator.coordinator import StartSettings, start_coordinator
from server.coordinator.coordinator_run import RunRequest, network_bytes, submit_run, wait_for_run
from server.run_record import read_metrics

TRANSPORTS = ("plaintext", "TLS")
RUN_OVERRIDES = {"TLS+SecAgg+": {"secagg": True}}  # bench/secure_aggregation.py: TLS, masked sums
GOAL_RATIO = 1.10
RUN_TIMEOUT = 1800.0

# The transport costs are measured on plain runs: these sites accept them (a joined site's
# default policy requires DP-SGD).
REHEARSAL = SitePolicy(require_dp=False, source="bench/transport.py")


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts every byte in both directions (plain threads: a few
    dozen connections at most, and nothing to cancel at exit but sockets)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.bytes = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])

    def __enter__(self) -> CountingRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    self.bytes += len(chunk)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class Measurement:
    transport: str
    clients: int
    round_seconds: list[float]
    round_bytes: list[int]
    flower_bytes: int  # Flower's own payload counter for the whole run
    rounds: int

    @property
    def seconds(self) -> float:
        return statistics.median(self.round_seconds)

    @property
    def wire_bytes(self) -> float:
        return statistics.median(self.round_bytes)


def write_sites(directory: Path, count: int) -> list[Path]:
    """The heart records, shuffled deterministically and dealt into `count` site files."""
    columns = list(load_schema(BUNDLED_SCHEMAS["heart"]).columns())
    rows = sorted(load_heart_rows(), key=lambda row: hash(tuple(row.values())) % 9973)
    paths = []
    for index in range(count):
        path = directory / f"site-{index + 1}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows[index::count])
        paths.append(path)
    return paths


def _names(count: int) -> list[str]:
    return [f"{'hospital' if i % 2 == 0 else 'bank'}-{i // 2 + 1}" for i in range(count)]


def _follow(run_dir: Path, relay: CountingRelay, timeout: float) -> list[int]:
    """Relay byte counts at the end of the initial evaluation and of every round."""
    samples: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = read_metrics(run_dir) or {}
        done = (1 if metrics.get("initial") else 0) + len(metrics.get("rounds", []))
        while len(samples) < done:
            samples.append(relay.bytes)
        if metrics.get("status") in ("completed", "failed"):
            return samples
        time.sleep(0.1)
    return samples


def measure(
    transport: str,
    client_counts: list[int],
    rounds: dict[int, int],
    root: Path,
    on_result: Callable[[Measurement], None],
) -> None:
    """One coordinator per transport; sites added as the client count grows."""
    insecure = transport == "plaintext"
    names = _names(max(client_counts))
    certs = None if insecure else init_certs(root / "certs", ["127.0.0.1"], names)
    root.mkdir(parents=True, exist_ok=True)
    files = write_sites(root, len(names))
    coordinator = start_coordinator(
        StartSettings(
            certs.root if certs else None, root / "state", "127.0.0.1", free_port(), insecure
        )
    )
    nodes: list[Site] = []
    try:
        with CountingRelay(coordinator.settings.port) as relay:
            for count in client_counts:
                while len(nodes) < count:
                    name = names[len(nodes)]
                    settings = JoinSettings(
                        role=name.split("-")[0], data=files[len(nodes)], task="heart",
                        coordinator=f"127.0.0.1:{relay.port}",
                        ca=None if certs is None else certs.ca_cert,
                        key=None if certs is None else certs.client_private_key(name),
                        name=name, insecure=insecure, work_dir=root / "nodes" / name,
                        policy=REHEARSAL,
                    )  # fmt: skip
                    nodes.append(start_supernode(prepare_join(settings), name))
                out = root / f"run-{count}"
                submitted = submit_run(RunRequest(
                    state=root / "state", out=out, rounds=rounds[count],
                    overrides={"local-epochs": 1, **RUN_OVERRIDES.get(transport, {})},
                    clients=count, wait_timeout=600,
                ))  # fmt: skip
                samples = _follow(out, relay, RUN_TIMEOUT)
                metrics = wait_for_run(submitted, RUN_TIMEOUT)
                on_result(Measurement(
                    transport, count, [float(r["seconds"]) for r in metrics["rounds"]],
                    [b - a for a, b in itertools.pairwise(samples)],
                    network_bytes(submitted).get("total-bytes", 0), rounds[count],
                ))  # fmt: skip
    finally:
        for node in reversed(nodes):
            node.stop()
        coordinator.stop()


def report(results: list[Measurement], command: str, load: tuple[float, float]) -> str:
    by_key = {(m.transport, m.clients): m for m in results}
    lines = [
        "## Transport: TLS vs plaintext",
        "",
        f"`{command}` on {setup_line()}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (a shared machine: wall times are noisy).",
        "",
        "Real deployment on 127.0.0.1: `confide coordinator` (SuperLink on loopback behind nginx) "
        "and one `flower-supernode` per site. Plaintext = `--insecure` (no TLS, no SuperNode "
        "authentication); TLS = the production path (TLS 1.3 to nginx, signed Fleet requests). "
        "Round time = the ServerApp's train + evaluate time, median over rounds. Bytes on the wire "
        "= everything between the sites and the coordinator's public port per round (a counting "
        "TCP relay: TLS records, HTTP framing, polling and heartbeats included), median over "
        "rounds. Flower payload = the run's own byte counter per round (messages only). Default "
        "heart model, 1 local epoch.",
        "",
        "| clients | transport | rounds | round time, s (min-max) | bytes on wire / round | Flower payload / round |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for m in results:
        spread = f" ({min(m.round_seconds):.1f}-{max(m.round_seconds):.1f})"
        lines.append(
            f"| {m.clients} | {m.transport} | {m.rounds} | {m.seconds:.1f}{spread} | "
            f"{m.wire_bytes / 1e6:.3f} MB | {m.flower_bytes / (m.rounds + 1) / 1e6:.3f} MB |"
        )
    lines += [
        "",
        "| clients | TLS/plaintext time | TLS/plaintext bytes | goal |",
        "|---:|---:|---:|---|",
    ]
    for clients in sorted({m.clients for m in results}):
        plain, tls = by_key.get(("plaintext", clients)), by_key.get(("TLS", clients))
        if plain and tls:
            time_ratio, byte_ratio = tls.seconds / plain.seconds, tls.wire_bytes / plain.wire_bytes
            met = "met" if max(time_ratio, byte_ratio) <= GOAL_RATIO else "**missed**"
            lines.append(
                f"| {clients} | {time_ratio:.3f} | {byte_ratio:.3f} | <= {GOAL_RATIO:.2f}: {met} |"
            )
    lines += [
        "",
        "Reading the table: every site starts a fresh `flwr-clientapp` process per message "
        "(Flower's deployment model), so process start-up, not encryption, sets the round time; "
        "on this shared machine round times vary by more than the TLS/plaintext difference (see "
        "min-max), so the time ratio is within noise. The byte overhead of the TLS path is mostly "
        "SuperNode authentication: about 515 bytes of public-key, signature and timestamp "
        "headers on every Fleet request, idle polls included (each site polls every few "
        "seconds); TLS 1.3 framing adds about 22 bytes per record. The model payload is "
        "identical.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    # `timeout`, CI and kill send SIGTERM: unwind through the finally blocks that stop processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--keep", type=Path, help="work here and keep logs (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3 for "
                        "2 clients, 2 for 10)")  # fmt: skip
    args = parser.parse_args()
    counts = sorted(set(args.clients))
    rounds = {c: args.rounds or (3 if c <= 2 else 2) for c in counts}
    load_start = os.getloadavg()[0]
    command = (
        "python -m bench.transport"
        + (f" --clients {' '.join(map(str, counts))}" if counts != [2, 10] else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
    )
    results: list[Measurement] = []

    def record(measurement: Measurement) -> None:
        """Print and write after every configuration: a long run's figures survive a late crash."""
        results.append(measurement)
        print(f"{measurement.transport:9} {measurement.clients:2} clients: "
              f"{measurement.seconds:6.1f} s/round, {measurement.wire_bytes / 1e6:6.3f} MB/round",
              flush=True)  # fmt: skip
        write_section("transport", report(results, command, (load_start, os.getloadavg()[0])))

    for transport in args.transports:
        if args.keep:
            measure(transport, counts, rounds, args.keep.resolve() / transport, record)
            continue
        with tempfile.TemporaryDirectory(prefix=f"confide-bench-{transport}-") as scratch:
            measure(transport, counts, rounds, Path(scratch), record)
    print("wrote bench/results/transport.md")


if __name__ == "__main__":
    main()
