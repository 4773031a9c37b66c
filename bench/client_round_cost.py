"""Confide's own CPU per client-round, without Ray: the real ClientApp and round loop in one process.

    .venv/bin/python -m bench.client_round_cost                 # 300 of 1,000 banks, 3 rounds
    .venv/bin/python -m bench.client_round_cost --nodes 100 --rounds 2

`bench.scale` measures the whole process tree, where Flower's engine (Ray, the LinkState) and the
rest of a shared machine blur a difference of a millisecond. Here the real ServerApp round
(`server.federation.run_round`: messages out, screening, aggregation, evaluation, the record) talks
to the real ClientApp through `tests.local_grid.LocalGrid`, which hands messages over as objects:
what is left is Confide's work plus Flower's message objects and strategy. The workload is
`bench.scale`'s at 1,000 clients (bank, Dirichlet 2.0, 1 local epoch, batch 64), on `--nodes` of
its clients, one torch thread as a Ray worker with 1 CPU has. CPU time of this process per
client-round (train + evaluate), split into the clients' training (`train_epochs`), the rest of
the ClientApp, and the coordinator's side; medians over the rounds after the first.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Strategy

import client.app as client_module
from client.app import app as client_app
from common.federated_model import initial_federated_state
from common.run_config import RunConfig
from common.tasks import task_schema
from server.app import update_policy
from server.federation import run_round
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid

BASELINE_APP = Path(__file__).resolve().parent / "baseline_app"
SETTINGS = {
    "task": "bank",
    "num-clients": 1000,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 2.0,
    "local-epochs": 1,
}


class Clock:
    """CPU seconds of this process, in total and inside the wrapped functions."""

    def __init__(self) -> None:
        self.inside: dict[str, float] = {}

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.inside[name] = self.inside.get(name, 0.0) + time.process_time() - started

        return timed


@contextlib.contextmanager
def timed_training(clock: Clock) -> Iterator[None]:
    """Time the training and the evaluation inside the ClientApp's handlers."""
    originals = {name: getattr(client_module, name) for name in ("train_epochs", "evaluate")}
    for name, function in originals.items():
        setattr(client_module, name, clock.wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(client_module, name, function)


def floor_client_app() -> ClientApp:
    """The baseline app's ClientApp: its package `bankbaseline` sits in its app directory, which
    Flower's engine puts on the path."""
    sys.path.insert(0, str(BASELINE_APP))
    from bankbaseline.client_app import app

    return app


def floor_seconds(
    grid: LocalGrid, strategy: FedAvg, arrays: ArrayRecord, server_round: int
) -> float:
    """CPU seconds of one round of `bench.scale`'s flower-floor in the same harness: FedAvg's round
    (as its `start` runs it) against the baseline app's handlers that reply at once."""
    started = time.process_time()
    replies = grid.send_and_receive(
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    )
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    evaluate = strategy.configure_evaluate(server_round, aggregated, ConfigRecord(), grid)
    strategy.aggregate_evaluate(server_round, grid.send_and_receive(evaluate))
    return time.process_time() - started


def confide_round(
    grid: LocalGrid, strategy: Strategy, arrays: ArrayRecord, server_round: int, config: RunConfig
) -> tuple[ArrayRecord, float, Clock]:
    """Confide's round (`run_round`, as the ServerApp runs it): new arrays, CPU seconds, clock."""
    clock = Clock()
    grid.client_app = clock.wrap("client_app", client_app)
    with timed_training(clock):
        started = time.process_time()
        arrays, _ = run_round(grid, strategy, arrays, server_round, 600.0, update_policy(config))
        return arrays, time.process_time() - started, clock


def measure(nodes: int, rounds: int) -> list[dict[str, float]]:
    config = RunConfig.from_mapping(SETTINGS)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    node_configs = {n + 1: {"partition-id": n} for n in range(nodes)}
    grid = LocalGrid(client_app, config.to_mapping(), node_configs)
    floor_grid = LocalGrid(floor_client_app(), {"noop": True}, node_configs)
    strategy, floor_strategy = build_strategy(config), FedAvg()
    arrays = ArrayRecord(initial_federated_state(task_schema(config), config))
    figures = []
    for server_round in range(1, rounds + 1):  # the two alternate: a busy spell hits both
        floor = floor_seconds(floor_grid, floor_strategy, arrays, server_round)
        arrays, total, clock = confide_round(grid, strategy, arrays, server_round, config)
        per = 1000.0 / nodes  # ms per client-round
        client, training = clock.inside["client_app"], clock.inside["train_epochs"]
        figures.append(
            {
                "round": server_round,
                "total_ms": total * per,
                "training_ms": training * per,
                "evaluation_ms": clock.inside["evaluate"] * per,
                "client_rest_ms": (client - training - clock.inside["evaluate"]) * per,
                "coordinator_ms": (total - client) * per,
                "confide_ms": (total - training) * per,
                "floor_ms": floor * per,
                "above_floor_ms": (total - training - floor) * per,
            }
        )
        print(", ".join(f"{k} {v:.2f}" for k, v in figures[-1].items()), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=300, help="clients of the 1,000 in the run")
    parser.add_argument("--rounds", type=int, default=3, help="the first is warm-up")
    args = parser.parse_args()
    steady = measure(args.nodes, args.rounds)[1:]
    print("medians over rounds 2..:")
    for key in steady[0]:
        if key != "round":
            print(f"  {key}: {statistics.median(f[key] for f in steady):.2f}")


if __name__ == "__main__":
    main()
