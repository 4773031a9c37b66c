"""The same simulation on a running Ray cluster of one node and of two (`--ray-address`).

    .venv/bin/python -m bench.ray_cluster [--clients 40] [--rounds 2] [--repeats 2]

Each cluster is real: one-CPU Ray nodes started with `ray start` on 127.0.0.1
(tests/local_ray_cluster.py), so two nodes have twice the CPUs of one; on this 2-core machine they
share its cores, as nodes of a real cluster would not. Throughput = client-rounds / the rounds'
own seconds (metrics.json), medians over repeats, cluster sizes alternating.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.harness import confide, setup_line, write_section
from tests.local_ray_cluster import local_ray_cluster

SIZES = (1, 2)


def client_rounds_per_second(clients: int, rounds: int, nodes: int, work: Path) -> float:
    with local_ray_cluster(nodes, work) as cluster:
        metrics, _ = confide(
            "simulate", "heart", "--set", "partitioner=iid", "--clients", str(clients),
            "--rounds", str(rounds), "--ray-address", cluster.address, "--out", str(work / "run"),
        )  # fmt: skip
    seconds = sum(entry["seconds"] for entry in metrics["rounds"])
    return clients * rounds / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40, help="virtual clients (IID heart)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per cluster size")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for size in SIZES:
                work = Path(scratch) / f"{size}-{repeat}"
                work.mkdir()
                rates[size].append(client_rounds_per_second(args.clients, args.rounds, size, work))
                print(f"{size} node(s), repeat {repeat + 1}: {rates[size][-1]:.1f} client-rounds/s")
    one, two = (statistics.median(rates[size]) for size in SIZES)
    body = "\n".join([
        "## Simulation on a running Ray cluster: one node against two",
        "",
        f"`python -m bench.ray_cluster --clients {args.clients} --rounds {args.rounds} "
        f"--repeats {args.repeats}` on {setup_line()}.",
        "",
        "| cluster | client-rounds/s (median) | runs |",
        "| --- | ---: | --- |",
        *[f"| {size} one-CPU node(s) | {statistics.median(rates[size]):.1f} | "
          f"{', '.join(f'{r:.1f}' for r in rates[size])} |" for size in SIZES],
        "",
        f"Two nodes / one: **{two / one:.2f}x**.",
    ])  # fmt: skip
    print(body)
    print(write_section("ray-cluster", body + "\n"))


if __name__ == "__main__":
    main()
