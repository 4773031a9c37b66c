"""Dropped clients: a round goes on with the replies that arrived, if enough did; else it is retried,
then the run stops naming the round. Never a "completed" run without training."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import MessageType

from client.app import app as client_app
from common.run_config import RunConfig, RunConfigError
from server.app import main as server_main
from server.app import update_policy
from server.federation import Quorum, await_clients, run_round
from server.federation_error import FederationError
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid
from tests.test_update_validation import HOSPITALS, config_for, global_arrays


def drop_train_replies(nodes: set[int], tries: int | None = None):
    """`nodes` send no training reply (offline, or slower than the timeout): to the first
    `tries` training messages each, or to all of them when `tries` is None."""
    sent_to: dict[int, int] = {}

    def tamper(node: int, sent: Message, reply: Message) -> Message | None:
        if sent.metadata.message_type != MessageType.TRAIN or node not in nodes:
            return reply
        sent_to[node] = sent_to.get(node, 0) + 1
        return None if tries is None or sent_to[node] <= tries else reply

    return tamper


def fail_train(nodes: set[int]):
    """`nodes` answer every training message with an error, as a crashing SuperNode does."""

    def tamper(node: int, sent: Message, reply: Message) -> Message:
        if sent.metadata.message_type != MessageType.TRAIN or node not in nodes:
            return reply
        error = Message(Error(code=1, reason="RuntimeError: disk full"), reply_to=sent)
        error.metadata.__dict__["_src_node_id"] = node
        return error

    return tamper


def one_round(config: RunConfig, tamper):
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS, tamper=tamper)
    quorum = Quorum(config.min_train_replies, config.round_retries)
    return run_round(
        grid, build_strategy(config), global_arrays(config), 1, 30, update_policy(config),
        quorum=quorum,
    )  # fmt: skip


def test_a_round_goes_on_with_the_replies_that_arrived_when_the_quorum_is_met():
    config = config_for(**{"min-train-replies": 3})
    _, record = one_round(config, drop_train_replies({13}))
    trained = {client["id"] for client in record.clients if "train_examples" in client}
    assert trained == {10, 11, 12}
    assert record.retries == 0
    assert len(record.clients) == 4  # the dropped site still evaluates the new model


def test_a_round_short_of_its_quorum_is_retried_and_the_retry_is_recorded():
    config = config_for(**{"min-train-replies": 4, "round-retries": 2})
    _, record = one_round(config, drop_train_replies({12, 13}, tries=1))
    assert record.retries == 1
    assert record.as_json()["retries"] == 1
    assert {client["id"] for client in record.clients if "train_examples" in client} == set(
        HOSPITALS
    )


def test_a_round_that_stays_short_stops_the_run_naming_round_replies_and_minimum():
    config = config_for(**{"min-train-replies": 3, "round-retries": 1})
    with pytest.raises(FederationError) as raised:
        one_round(config, fail_train({12, 13}))
    message = str(raised.value)
    assert message.startswith("round 1: only 2 of 4 sampled clients returned a usable update")
    assert "min-train-replies = 3, in each of 2 tries" in message
    assert "disk full" in message


def test_no_reply_at_all_says_none_arrived_within_the_timeout():
    config = config_for(**{"round-retries": 0})
    with pytest.raises(FederationError, match="round 1: no client returned a usable update") as e:
        one_round(config, drop_train_replies(set(HOSPITALS)))
    assert "none replied within round-timeout = 30s" in str(e.value)


def test_a_run_that_loses_its_quorum_is_recorded_as_failed_never_completed(tmp_path):
    calls = {"train": 0}

    def lose_three_after_round_one(node: int, sent: Message, reply: Message) -> Message | None:
        if sent.metadata.message_type == MessageType.TRAIN:
            calls["train"] += 1
            if calls["train"] > len(HOSPITALS) and node != 10:
                return None
        return reply

    config = config_for(**{"run-dir": str(tmp_path), "num-server-rounds": 3,
                           "min-train-replies": 2})  # fmt: skip
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS, tamper=lose_three_after_round_one)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=config.to_mapping())  # fmt: skip
    with pytest.raises(FederationError, match="round 2: only 1 of 4 sampled clients returned"):
        server_main(grid, context)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("round 2:")
    assert [entry["round"] for entry in metrics["rounds"]] == [1]  # round 1 kept, resumable


def test_a_client_gone_for_good_does_not_stall_sampling():
    """Flower's sampling waits without a timeout for its minimum; that minimum is the quorum."""
    config = config_for(**{"min-train-replies": 2})  # num-clients = 4, two are gone
    two_left = {10: HOSPITALS[10], 11: HOSPITALS[11]}
    grid = LocalGrid(client_app, config.to_mapping(), two_left)
    messages = build_strategy(config).configure_train(
        1, global_arrays(config), ConfigRecord(), grid
    )
    assert len(list(messages)) == 2


def test_the_first_round_waits_for_the_federation_but_not_for_ever():
    config = config_for(**{"min-train-replies": 2})
    grid = LocalGrid(client_app, config.to_mapping(), {10: HOSPITALS[10], 11: HOSPITALS[11]})
    assert await_clients(grid, expected=4, minimum=2, timeout=0.1) == 2
    with pytest.raises(FederationError, match=r"only 2 of 4 clients connected within 0\.1s"):
        await_clients(grid, expected=4, minimum=3, timeout=0.1)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"min-train-replies": 0}, "'min-train-replies' = 0 is invalid"),
        ({"min-train-replies": 5}, "from 1 to num-clients (4)"),
        ({"round-retries": -1}, "'round-retries' = -1 is invalid"),
        ({"min-train-replies": 0.5}, "expected int"),
    ],
)
def test_quorum_settings_are_validated(settings, expected):
    with pytest.raises(RunConfigError) as raised:
        RunConfig.from_mapping(settings)
    assert expected in str(raised.value)
