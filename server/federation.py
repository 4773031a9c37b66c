"""The round loop: send the global model, collect replies, aggregate, evaluate, record.

Flower's `Strategy.start` runs this loop too, but it lets a run "complete" when every client failed
and keeps per-client results to itself. Owning the loop (about fifty lines) lets Confide count every
failed reply, retry a round short of its quorum, stop loudly when it stays short, and checkpoint
after each round.
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
from flwr.superlink.grid import InMemoryGrid

from common.packed_arrays import pack
from common.site_policy import REFUSED
from server.federation_error import FederationError
from server.incoming import RunningMean, folds_mean, replies_as_they_arrive
from server.secure_aggregation import SecureAggregation
from server.strategy_state import strategy_state
from server.update_validation import UpdatePolicy, global_values, screen_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quorum:
    """How many usable updates a round needs, and how often a short round is sent again.

    A dropped client (crashed, offline, slower than `round-timeout`) must not stall the run, yet
    a round aggregated from too few sites is not the federation's model: below `minimum` the round
    is retried with fresh sampling, and after `retries` more tries the run stops and says why.
    """

    minimum: int = 1
    retries: int = 0


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
    retries: int = 0
    # DP-SGD: epsilon of every client that trained, evaluated this round or not (with sampling,
    # few clients do both, and `clients` holds the evaluated ones)
    trained_epsilons: dict[int, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        document = {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "seconds": self.seconds,
            "failed": len(self.failures),
            "refused": sum(bool(f.get("refused")) for f in self.failures),
            "failures": self.failures,
            "rejected": len(self.rejected),
            "rejections": self.rejected,
            "retries": self.retries,
            "clients": self.clients,
        }
        epsilons = [client["epsilon"] for client in self.clients if "epsilon" in client]
        epsilons += self.trained_epsilons.values()
        if epsilons:
            document["epsilon_max"] = max(epsilons)
        if self.trained_epsilons:
            document["trained_epsilons"] = {str(k): v for k, v in self.trained_epsilons.items()}
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


def failure(reply: Message) -> dict[str, Any] | None:
    """The record of a failed reply (node and reason), None for a usable one."""
    if not reply.has_error():
        return None
    reason = (reply.error.reason or "no reason given").strip().splitlines()
    failed = {
        "id": reply.metadata.src_node_id,
        "reason": reason[-1] if reason else "",
        "refused": reply.error.code == REFUSED,
    }
    log.warning("node %s failed: %s", failed["id"], failed["reason"])
    return failed


def split_replies(replies: Iterable[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
    """Usable replies, and a record of each failed one (node and reason)."""
    usable, failures = [], []
    for reply in replies:
        if (failed := failure(reply)) is None:
            usable.append(reply)
        else:
            failures.append(failed)
    return usable, failures


def outgoing(
    messages: Iterable[Message], arrays: ArrayRecord, grid: Grid, timeout: float
) -> list[Message]:
    """The strategy's messages as they leave. Each lives one round (`timeout`): a site that gets
    it late, after its run stopped or its round ended, drops it instead of training for a reply
    nobody waits for. Over a network the model is packed into one array (common/packed_arrays.py),
    where Flower would send each of its tensors as separate requests; Flower's in-memory grid
    (simulation) hands messages over as objects, where packing would only cost."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = timeout
    if isinstance(grid, InMemoryGrid):
        return messages
    wire = pack(arrays)
    for message in messages:
        for key in message.content.array_records:
            message.content[key] = wire
    return messages


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
    messages = outgoing(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
        arrays, grid, timeout,
    )  # fmt: skip
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
            if "train-seconds" in trained:  # under DP only where the site's policy allows it
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


@dataclass
class TrainingReplies:
    trained: list[Message]
    failures: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    retries: int
    mean: ArrayRecord | None = None  # folded as the updates arrived (server/incoming.py)


def screen_updates(
    replies: Iterable[Message], arrays: ArrayRecord, policy: UpdatePolicy, fold: RunningMean | None
) -> TrainingReplies:
    """Each reply as it arrives: a failure, a rejected update, or a usable one, which `fold`
    (when the strategy's aggregate is its running mean) takes in, letting go of its model."""
    screened = TrainingReplies([], [], [], retries=0)
    reference = global_values(arrays)
    for reply in replies:
        if (failed := failure(reply)) is not None:
            screened.failures.append(failed)
        elif (reason := screen_update(reply, arrays, policy, reference)) is not None:
            node = reply.metadata.src_node_id
            log.warning("rejected the update of node %s (%s): %s", node, client_name(reply), reason)
            screened.rejected.append({"id": node, "name": client_name(reply), "reason": reason})
        else:
            if fold is not None:
                fold.add(reply)
            screened.trained.append(reply)
    if fold is not None:
        screened.mean = fold.mean()
    return screened


def client_level_privacy(strategy: Strategy) -> dict[str, float]:
    """Flower's DP wrappers: the norm used this round and, where it accounts, the epsilon."""
    if not hasattr(strategy, "clipping_norm"):
        return {}
    privacy = {
        "clipping_norm": float(strategy.clipping_norm),
        "noise_multiplier": float(strategy.noise_multiplier),
    }
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is not None:
        privacy |= {"epsilon": spent.epsilon, "delta": spent.delta}
    return privacy


def await_clients(grid: Grid, expected: int, minimum: int, timeout: float) -> int:
    """Wait (at most `timeout`) for the expected clients before the first round, so it does not
    start with the few that registered first ("Sampled 2 nodes out of 200"); fewer than `minimum`
    by then stops the run. Returns how many are connected."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() >= deadline:
            if connected < minimum:
                raise FederationError(
                    f"only {connected} of {expected} clients connected within {timeout:g}s, "
                    f"fewer than min-train-replies = {minimum}"
                )
            log.warning("starting with %d of %d clients connected", connected, expected)
            break
        time.sleep(1.0)
    return connected


def collect_updates(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    server_round: int,
    timeout: float,
    policy: UpdatePolicy,
    quorum: Quorum,
) -> TrainingReplies:
    """The usable updates that arrived within `timeout`, trying again while fewer than the quorum;
    the failures and rejections of every try are kept for the round's record."""
    failures: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for attempt in range(quorum.retries + 1):
        messages = outgoing(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
            arrays, grid, timeout,
        )  # fmt: skip
        fold = RunningMean() if folds_mean(strategy) else None
        replies = replies_as_they_arrive(grid, messages, timeout)
        screened = screen_updates(replies, arrays, policy, fold)
        trained = screened.trained
        failures += [{**f, "stage": "train", "attempt": attempt + 1} for f in screened.failures]
        rejected += [{**r, "attempt": attempt + 1} for r in screened.rejected]
        if len(trained) >= quorum.minimum:
            return TrainingReplies(trained, failures, rejected, attempt, screened.mean)
        log.warning(
            "round %d, try %d of %d: %d of %d sampled clients returned a usable update, fewer "
            "than min-train-replies = %d",
            server_round, attempt + 1, quorum.retries + 1, len(trained), len(messages),
            quorum.minimum,
        )  # fmt: skip
    problems = failures + rejected
    reasons = "; ".join(f"node {p['id']}: {p['reason']}" for p in problems[-3:])
    usable = f"only {len(trained)} of {len(messages)} sampled clients" if trained else "no client"
    raise FederationError(
        f"round {server_round}: {usable} returned a usable update, fewer than "
        f"min-train-replies = {quorum.minimum}, in each of {quorum.retries + 1} tries "
        f"({reasons or 'none replied within round-timeout = ' + format(timeout, 'g') + 's'})"
    )


def run_round(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    server_round: int,
    timeout: float,
    policy: UpdatePolicy,
    central_evaluation: CentralEvaluation | None = None,
    quorum: Quorum = Quorum(),
    secure: SecureAggregation | None = None,
) -> tuple[ArrayRecord, RoundRecord]:
    started = time.perf_counter()
    if secure:  # SecAgg+: the coordinator gets the masked sum only, nothing to screen one by one
        secured = secure.train(arrays, server_round)
        new_arrays, train_metrics = secured.arrays, secured.train_metrics
        replies = TrainingReplies([], secured.failures, [], retries=0)
    else:
        replies = collect_updates(grid, strategy, arrays, server_round, timeout, policy, quorum)
        new_arrays = replies.mean
        if new_arrays is None:
            new_arrays, _ = strategy.aggregate_train(server_round, replies.trained)
        train_metrics = {reply.metadata.src_node_id: _metrics(reply) for reply in replies.trained}
    if new_arrays is None:
        raise FederationError(f"round {server_round}: the strategy could not aggregate the updates")
    new_arrays = same_dtypes(new_arrays, arrays)
    record = evaluate_round(grid, strategy, new_arrays, server_round, timeout, train_metrics)
    record.failures = replies.failures + record.failures
    record.rejected = replies.rejected
    record.retries = replies.retries
    record.trained_epsilons = {
        node: float(metrics["epsilon"])
        for node, metrics in train_metrics.items()
        if "epsilon" in metrics
    }
    if central_evaluation:
        record.central = central_evaluation(new_arrays)
    record.client_level = client_level_privacy(strategy)
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
    quorum: Quorum = Quorum(),
    secure: SecureAggregation | None = None,
) -> ArrayRecord:
    for server_round in range(first_round, num_rounds + 1):
        arrays, record = run_round(
            grid,
            strategy,
            arrays,
            server_round,
            timeout,
            policy,
            central_evaluation,
            quorum,
            secure,
        )
        log.info(
            "round %d/%d: accuracy %.4f, loss %.4f, %d clients, %d failed, %d rejected, "
            "%d retries, %.1fs",
            server_round,
            num_rounds,
            record.accuracy,
            record.loss,
            len(record.clients),
            len(record.failures),
            len(record.rejected),
            record.retries,
            record.seconds,
        )
        on_round(record, arrays, strategy_state(strategy))
    return arrays
