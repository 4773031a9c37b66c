"""Specifications for simulated dropouts and stragglers: seeded, simulation-only, reported per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.simulated_faults import Fault, fault_for, simulated_faults
from common.run_config import RunConfig, RunConfigError
from tests.local_grid import LocalGrid
from tests.test_run_report import run_heart


def faults(config: RunConfig, server_round: int, clients: int) -> list[Fault]:
    return [fault_for(config, server_round, partition) for partition in range(clients)]


def test_the_same_seed_round_and_client_always_get_the_same_fault() -> None:
    config = RunConfig.from_mapping({"dropout-fraction": 0.3, "straggler-fraction": 0.3})
    assert faults(config, 4, 50) == faults(config, 4, 50)
    assert faults(config, 4, 50) != faults(config, 5, 50)


def test_the_fractions_set_how_many_clients_drop_and_straggle() -> None:
    config = RunConfig.from_mapping({"dropout-fraction": 0.2, "straggler-fraction": 0.1})
    drawn = faults(config, 1, 5000)
    assert drawn.count(Fault.DROP) / 5000 == pytest.approx(0.2, abs=0.02)
    assert drawn.count(Fault.STRAGGLE) / 5000 == pytest.approx(0.1, abs=0.02)


def test_no_fractions_means_no_faults() -> None:
    assert set(faults(RunConfig.from_mapping({}), 1, 1000)) == {Fault.NONE}


def test_dropout_and_straggler_fractions_cannot_exceed_one_together() -> None:
    with pytest.raises(
        RunConfigError,
        match=r"'straggler-fraction' = 0\.6 is invalid; use a number in \[0, 1 - dropout-fraction\]",
    ):
        RunConfig.from_mapping({"dropout-fraction": 0.5, "straggler-fraction": 0.6})


def train_request(server_round: int) -> Message:
    LocalGrid(client_app, {}, {})  # sets the task identity a Message needs
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def context(node_config: dict, **settings) -> Context:
    run_config = RunConfig.from_mapping(settings).to_mapping()
    return Context(1, 1, node_config, RecordDict(), run_config)


def test_a_straggler_replies_after_its_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("client.simulated_faults.time.sleep", slept.append)
    request = train_request(1)
    settings = {"straggler-fraction": 1.0, "straggler-delay": 2.5}
    reply = simulated_faults(request, context({"partition-id": 0}, **settings), lambda m, c: m)
    assert reply is request and slept == [2.5]


def test_a_real_site_never_drops() -> None:
    request = train_request(1)
    node = context({"data-path": "/data/site.csv"}, **{"dropout-fraction": 1.0})
    assert simulated_faults(request, node, lambda m, c: m) is request


def test_dropouts_fail_their_train_reply_and_each_round_reports_them(tmp_path: Path) -> None:
    # seed 1: partitions 0 and 3 drop in round 1, partition 0 in round 2 (see fault_for)
    run_heart(tmp_path, seed=1, **{"dropout-fraction": 0.5})
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [entry["failed"] for entry in rounds] == [2, 1]
    assert {f["id"] for f in rounds[0]["failures"]} == {10, 13}
    assert all("dropped out" in f["reason"] for entry in rounds for f in entry["failures"])
    assert all(len(entry["clients"]) == 4 for entry in rounds)  # evaluation is untouched
    report = (tmp_path / "report.md").read_text()
    assert "| 1 | " in report and "Failed replies (3" in report
