"""A coordinator that survives bad updates: every reply is screened before it is aggregated."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from client.app import app as client_app
from common.model_factory import build_model
from common.run_config import RunConfig
from common.tasks import task_schema
from server.app import update_policy
from server.federation import evaluate_round, run_round
from server.strategy_choice import build_strategy
from server.update_validation import UpdatePolicy, screen_update
from tests.local_grid import LocalGrid, named_arrays

HOSPITALS = {10 + i: {"partition-id": i} for i in range(4)}
CLEVELAND = 10


def config_for(**overrides) -> RunConfig:
    return RunConfig.from_mapping({"local-epochs": 1, **overrides})


def global_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(build_model(task_schema(config), config).state_dict())


def replace_arrays(reply: Message, transform) -> Message:
    """A hostile client's reply: named arrays (the coordinator accepts them as well as packed)."""
    arrays = named_arrays(reply.content["arrays"], config_for())
    reply.content["arrays"] = ArrayRecord(
        {name: Array(transform(name, array.numpy())) for name, array in arrays.items()}
    )
    return reply


def poison_cleveland(transform):
    """Cleveland's train replies pass through `transform(name, sent, received)`."""

    def tamper(node: int, sent: Message, reply: Message) -> Message:
        if node != CLEVELAND or reply.has_error() or "arrays" not in reply.content:
            return reply
        global_model = named_arrays(sent.content["arrays"], config_for())
        return replace_arrays(reply, lambda n, a: transform(n, global_model[n].numpy(), a))

    return tamper


def one_round(config: RunConfig, tamper=None):
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS, tamper=tamper)
    return run_round(
        grid, build_strategy(config), global_arrays(config), 1, 30, update_policy(config)
    )


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (lambda name, g, a: np.full_like(a, np.nan), "holds NaN or infinite values"),
        (lambda name, g, a: np.full_like(a, np.inf), "holds NaN or infinite values"),
        (lambda name, g, a: np.zeros((3, 3), dtype=a.dtype), "expected float32"),
        (lambda name, g, a: a.astype(np.float64), "is float64"),
    ],
    ids=["nan", "inf", "wrong shape", "wrong dtype"],
)
def test_a_broken_update_is_rejected_reported_and_the_round_goes_on(poison, reason):
    _, record = one_round(config_for(), tamper=poison_cleveland(poison))
    (rejection,) = record.rejected
    assert rejection["id"] == CLEVELAND and rejection["name"] == "cleveland"
    assert reason in rejection["reason"]
    assert record.as_json()["rejected"] == 1
    assert np.isfinite(record.accuracy)
    assert len(record.clients) == 4  # the rejected client still evaluates the new model


def test_missing_parameters_are_rejected():
    def drop_one(node: int, sent: Message, reply: Message) -> Message:
        if node == CLEVELAND and "arrays" in reply.content:
            arrays = reply.content["arrays"]
            first = next(iter(arrays))
            reply.content["arrays"] = ArrayRecord({k: v for k, v in arrays.items() if k != first})
        return reply

    _, record = one_round(config_for(), tamper=drop_one)
    assert "parameter names differ" in record.rejected[0]["reason"]


def make_reply(arrays: ArrayRecord, num_examples: object) -> Message:
    from flwr.app import RecordDict

    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples})}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize("claim", [0, -5, 10**9, 2.5])
def test_an_implausible_num_examples_is_rejected(claim):
    config = config_for()
    arrays = global_arrays(config)
    policy = UpdatePolicy(0.0, "reject", 1_000_000)
    reason = screen_update(make_reply(arrays, claim), arrays, policy)
    assert reason is not None and "num-examples" in reason


def shifted(arrays: ArrayRecord, by: float) -> ArrayRecord:
    return ArrayRecord({n: Array(a.numpy() + np.float32(by)) for n, a in arrays.items()})


def update_norm(update: ArrayRecord, base: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((update[n].numpy() - base[n].numpy()) ** 2) for n in base)))


def test_an_update_over_the_norm_bound_is_rejected_or_clipped():
    config = config_for()
    base = global_arrays(config)
    assert screen_update(make_reply(shifted(base, 1.0), 10), base, UpdatePolicy(5.0, "reject", 100))
    clipped_reply = make_reply(shifted(base, 1.0), 10)
    assert screen_update(clipped_reply, base, UpdatePolicy(5.0, "clip", 100)) is None
    assert update_norm(clipped_reply.content["arrays"], base) == pytest.approx(5.0, rel=1e-4)
    small = make_reply(shifted(base, 1e-4), 10)
    assert screen_update(small, base, UpdatePolicy(5.0, "reject", 100)) is None


SIX_CLIENTS = {10 + i: {"partition-id": i} for i in range(6)}


def accuracy_after_poisoned_rounds(strategy: str, rounds: int = 3) -> float:
    """Six clients on an IID split of heart; Cleveland's node sends its update sign-flipped and
    scaled by 100."""
    config = config_for(strategy=strategy, partitioner="iid", **{"num-clients": 6})
    flip_and_scale = poison_cleveland(lambda name, g, a: g - 100 * (a - g))
    grid = LocalGrid(client_app, config.to_mapping(), SIX_CLIENTS, tamper=flip_and_scale)
    chosen, arrays = build_strategy(config), global_arrays(config)
    for server_round in range(1, rounds + 1):
        arrays, _ = run_round(grid, chosen, arrays, server_round, 30, update_policy(config))
    return evaluate_round(grid, chosen, arrays, rounds, 30).accuracy


@pytest.fixture(scope="module")
def poisoned_fedavg_accuracy() -> float:
    return accuracy_after_poisoned_rounds("fedavg")


@pytest.mark.parametrize("robust", ["fedmedian", "multikrum"])
def test_one_poisoned_client_wrecks_fedavg_but_not_a_robust_strategy(
    robust, poisoned_fedavg_accuracy
):
    robust_accuracy = accuracy_after_poisoned_rounds(robust)
    assert robust_accuracy >= 0.75
    assert poisoned_fedavg_accuracy < robust_accuracy - 0.15
