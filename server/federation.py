"""The round loop: send the global model, collect replies, aggregate, evaluate, record.

Flower's `Strategy.start` runs this loop too, but it lets a run "complete" when every client failed
and keeps per-client results to itself. Owning the loop (about fifty lines) lets Confide count every
failed reply, stop loudly when a round has no usable reply, and checkpoint after each round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.strategy_state import strategy_state
from server.update_validation import UpdatePolicy, screen_update

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A round that cannot go on: no client replied with a usable result."""


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    seconds: float
    clients: list[dict[str, Any]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    central: dict[str, float] = field(default_factory=dict)
    client_level: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        document = {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "seconds": self.seconds,
            "failed": len(self.failures),
            "failures": self.failures,
            "rejected": len(self.rejected),
            "rejections": self.rejected,
            "clients": self.clients,
        }
        epsilons = [client["epsilon"] for client in self.clients if "epsilon" in client]
        if epsilons:
            document["epsilon_max"] = max(epsilons)
        if self.central:
            document["central"] = self.central
        if self.client_level:
            document["client_level_privacy"] = self.client_level
        return document


CentralEvaluation = Callable[[ArrayRecord], dict[str, float]]
RoundCallback = Callable[[RoundRecord, ArrayRecord, dict[str, np.ndarray]], None]


def client_name(reply: Message) -> str:
    client = reply.content.config_records.get("client") if reply.has_content() else None
    return (
        str(client["name"]) if client and "name" in client else f"node-{reply.metadata.src_node_id}"
    )


def split_replies(replies: Iterable[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
    """Usable replies, and a record of each failed one (node and reason)."""
    usable, failures = [], []
    for reply in replies:
        if reply.has_error():
            reason = (reply.error.reason or "no reason given").strip().splitlines()
            failures.append(
                {"id": reply.metadata.src_node_id, "reason": reason[-1] if reason else ""}
            )
            log.warning("node %s failed: %s", reply.metadata.src_node_id, failures[-1]["reason"])
        else:
            usable.append(reply)
    return usable, failures


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


def evaluate_round(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    server_round: int,
    timeout: float,
    train_metrics: dict[int, MetricRecord] | None = None,
) -> RoundRecord:
    """Federated evaluation of `arrays` on every sampled client's held-out records."""
    started = time.perf_counter()
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    evaluated, failures = split_replies(grid.send_and_receive(messages, timeout=timeout))
    aggregated = strategy.aggregate_evaluate(server_round, evaluated) if evaluated else None
    clients = []
    for reply in evaluated:
        node, metrics = reply.metadata.src_node_id, _metrics(reply)
        client = {
            "id": node,
            "name": client_name(reply),
            "num_examples": int(metrics["num-examples"]),
            "accuracy": float(metrics["accuracy"]),
            "loss": float(metrics["loss"]),
        }
        if train_metrics and node in train_metrics:
            trained = train_metrics[node]
            client["train_examples"] = int(trained["num-examples"])
            client["train_seconds"] = float(trained["train-seconds"])
            if "epsilon" in trained:  # DP-SGD: cumulative over the data set's whole history
                client["epsilon"] = float(trained["epsilon"])
                client["delta"] = float(trained["delta"])
        clients.append(client)
    return RoundRecord(
        round=server_round,
        accuracy=float(aggregated["accuracy"]) if aggregated else float("nan"),
        loss=float(aggregated["loss"]) if aggregated else float("nan"),
        seconds=time.perf_counter() - started,
        clients=sorted(clients, key=lambda c: c["name"]),
        failures=[{**failure, "stage": "evaluate"} for failure in failures],
    )


def same_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Some strategies (FedAdam) compute in float64; the global model keeps its own dtypes, or
    every float32 update of the next round would look malformed."""
    return ArrayRecord(
        {
            name: Array(aggregated[name].numpy().astype(reference[name].dtype, copy=False))
            for name in reference
        }
    )


def screen_updates(
    replies: list[Message], arrays: ArrayRecord, policy: UpdatePolicy
) -> tuple[list[Message], list[dict[str, Any]]]:
    accepted, rejected = [], []
    for reply in replies:
        reason = screen_update(reply, arrays, policy)
        if reason is None:
            accepted.append(reply)
        else:
            node = reply.metadata.src_node_id
            log.warning("rejected the update of node %s (%s): %s", node, client_name(reply), reason)
            rejected.append({"id": node, "name": client_name(reply), "reason": reason})
    return accepted, rejected


def run_round(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    server_round: int,
    timeout: float,
    policy: UpdatePolicy,
    central_evaluation: CentralEvaluation | None = None,
) -> tuple[ArrayRecord, RoundRecord]:
    started = time.perf_counter()
    train_messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replied, failures = split_replies(grid.send_and_receive(train_messages, timeout=timeout))
    trained, rejected = screen_updates(replied, arrays, policy)
    if not trained:
        problems = failures + rejected
        reasons = "; ".join(f"node {f['id']}: {f['reason']}" for f in problems[:3])
        raise FederationError(
            f"round {server_round}: no client returned a usable update "
            f"({len(problems)} failed or rejected{': ' + reasons if reasons else ', none replied in time'})"
        )
    new_arrays, _ = strategy.aggregate_train(server_round, trained)
    if new_arrays is None:
        raise FederationError(f"round {server_round}: the strategy could not aggregate the updates")
    new_arrays = same_dtypes(new_arrays, arrays)
    train_metrics = {reply.metadata.src_node_id: _metrics(reply) for reply in trained}
    record = evaluate_round(grid, strategy, new_arrays, server_round, timeout, train_metrics)
    record.failures = [{**f, "stage": "train"} for f in failures] + record.failures
    record.rejected = rejected
    if central_evaluation:
        record.central = central_evaluation(new_arrays)
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is not None:  # client-level DP at the coordinator
        record.client_level = {"epsilon": spent.epsilon, "delta": spent.delta}
    record.seconds = time.perf_counter() - started
    return new_arrays, record


def run_federation(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    policy: UpdatePolicy,
    on_round: RoundCallback,
    central_evaluation: CentralEvaluation | None = None,
    first_round: int = 1,
) -> ArrayRecord:
    for server_round in range(first_round, num_rounds + 1):
        arrays, record = run_round(
            grid, strategy, arrays, server_round, timeout, policy, central_evaluation
        )
        log.info(
            "round %d/%d: accuracy %.4f, loss %.4f, %d clients, %d failed, %d rejected, %.1fs",
            server_round,
            num_rounds,
            record.accuracy,
            record.loss,
            len(record.clients),
            len(record.failures),
            len(record.rejected),
            record.seconds,
        )
        on_round(record, arrays, strategy_state(strategy))
    return arrays
