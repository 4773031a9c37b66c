"""Replies taken in as they arrive, and FedAvg's mean folded in without keeping a model per client.

At 10,000 virtual clients the coordinator held every reply's model at once (1 GiB); now a reply is
screened as it is pulled and, where the strategy's aggregate is a weighted mean, added to a running
sum and its model dropped. The mean must be the strategy's own, up to float rounding.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
)
from flwr.superlink.grid import InMemoryGrid

from client.app import app as client_app
from server.app import update_policy
from server.federation import Quorum, collect_updates
from server.incoming import FULL_PULL_EVERY, RunningMean, folds_mean, replies_as_they_arrive
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid
from tests.test_federation import HOSPITALS, heart_config, initial_arrays
from tests.test_forged_arrays import task_identity  # noqa: F401  (fixture)


def update(seed: int, examples: int) -> Message:
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord(
        {
            "weight": Array(rng.normal(size=(4, 8)).astype(np.float32)),
            "bias": Array(rng.normal(size=8).astype(np.float32)),
        }
    )
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), 1, "train")


def test_the_running_mean_is_fedavgs_and_lets_each_model_go() -> None:
    replies = [update(seed, examples) for seed, examples in enumerate([3, 30, 1, 300, 7])]
    expected, _ = FedAvg().aggregate_train(1, replies)
    running = RunningMean()
    for reply in replies:
        running.add(reply)
        assert not reply.content.array_records  # its model is gone, its metrics stay
        assert reply.content["metrics"]["num-examples"]
    mean = running.mean()
    assert list(mean) == list(expected)
    for name in expected:
        np.testing.assert_allclose(mean[name].numpy(), expected[name].numpy(), rtol=1e-6)
    assert RunningMean().mean() is None


def test_only_a_mean_weighted_by_examples_is_folded() -> None:
    class Reweighted(FedAvg):  # a subclass may aggregate otherwise
        pass

    assert folds_mean(FedAvg()) and folds_mean(FedProx())
    not_folded = [
        FedAvg(weighted_by_key="client-weight"),
        FedAdam(),
        FedMedian(),
        Krum(),
        Reweighted(),
        DifferentialPrivacyClientSideFixedClipping(FedAvg(), 1.0, 1.0, 4),
    ]
    assert not any(folds_mean(strategy) for strategy in not_folded)


class TwoPulls(InMemoryGrid):
    """A simulation's grid whose LinkState has one reply at the first pull and one at the next."""

    def __init__(self, replies: list[Message]) -> None:  # no LinkState needed
        self.pull_interval = 0.0
        self.replies, self.pulls = replies, 0

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        batch = self.replies[:1]
        self.replies = self.replies[1:]
        for reply in batch:
            reply.metadata.__dict__["_reply_to_message_id"] = str(self.pulls - 1)
        return batch


def test_a_simulations_replies_are_handed_over_as_they_are_pulled() -> None:
    grid = TwoPulls([update(0, 1), update(1, 1)])
    replies = iter(replies_as_they_arrive(grid, [update(2, 1), update(3, 1)], timeout=60))
    next(replies)
    assert grid.pulls == 1  # the first reply is screened before the second is pulled
    next(replies)
    assert grid.pulls == 2
    assert next(replies, None) is None  # every message answered: no more pulls


def test_flowers_in_memory_grid_still_answers_through_the_loop_it_mirrors() -> None:
    """`replies_as_they_arrive` repeats InMemoryGrid.send_and_receive's loop through public
    methods: if Flower's changes (another pull, another pause), the copy must follow."""
    source = inspect.getsource(InMemoryGrid.send_and_receive)
    assert all(name in source for name in ("push_messages", "pull_messages", "pull_interval"))
    assert inspect.signature(InMemoryGrid.__init__).parameters["pull_interval"].default == 0.1


class AnsweredPulls(InMemoryGrid):
    """A simulation's grid over Flower's in-memory LinkState, whose replies arrive one per pull."""

    def __init__(self, replies: int) -> None:
        from flwr.server.superlink.linkstate import InMemoryLinkState
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.superlink.federation import NoOpFederationManager

        self.state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
        self.pull_interval = 0.0
        self.replies, self.asked = replies, []

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.asked.append(set(message_ids))
        found = sorted(set(message_ids) & set(self.state.message_ins_id_to_message_res_id))
        if len(self.asked) <= self.replies:  # the next reply lands in the LinkState
            self.state.message_ins_id_to_message_res_id[str(len(self.asked) - 1)] = "reply"
        replies = []
        for message_id in found:
            reply = update(int(message_id), 1)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            del self.state.message_ins_id_to_message_res_id[message_id]
            replies.append(reply)
        return replies


def test_between_full_pulls_the_link_state_is_asked_about_answered_messages_only() -> None:
    messages = [update(i, 1) for i in range(FULL_PULL_EVERY + 5)]
    grid = AnsweredPulls(replies=len(messages))
    replies = list(replies_as_they_arrive(grid, messages, timeout=60))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        str(i) for i in range(len(messages))
    )
    everyone = {str(i) for i in range(len(messages))}
    assert grid.asked[0] == everyone  # the first pull asks about every message
    assert grid.asked[FULL_PULL_EVERY] <= everyone and len(grid.asked[FULL_PULL_EVERY]) > 1
    assert all(len(asked) == 1 for asked in grid.asked[1:FULL_PULL_EVERY])  # the one answered


def test_a_lost_reply_is_waited_for_until_the_timeout_only() -> None:
    grid = TwoPulls([update(0, 1)])
    replies = list(replies_as_they_arrive(grid, [update(2, 1), update(3, 1)], timeout=0.05))
    assert len(replies) == 1


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "krum"])
def test_a_round_keeps_the_models_only_where_the_strategy_needs_them(strategy: str) -> None:
    config = heart_config(strategy=strategy, **{"proximal-mu": 0.1})
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    replies = collect_updates(
        grid, build_strategy(config), initial_arrays(config), 1, 60, update_policy(config),
        Quorum(),
    )  # fmt: skip
    assert len(replies.trained) == len(HOSPITALS)
    folded = strategy != "krum"
    assert (replies.mean is not None) == folded
    assert all(bool(r.content.array_records) != folded for r in replies.trained)
