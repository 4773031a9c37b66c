"""The round loop with the real ClientApp and Flower strategies, over an in-process grid."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import ArrayRecord
from safetensors import safe_open

from client.app import app as client_app
from common.model_factory import build_model
from common.run_config import RunConfig
from common.tasks import task_schema
from server.app import update_policy
from server.federation import evaluate_round, run_federation, run_round
from server.federation_error import FederationError
from server.run_record import RunRecorder
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid

HOSPITALS = {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}


def heart_config(**overrides) -> RunConfig:
    return RunConfig.from_mapping({"local-epochs": 1, "num-server-rounds": 2, **overrides})


def initial_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(build_model(task_schema(config), config).state_dict())


def test_training_rounds_beat_the_initial_model():
    config = heart_config()
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    strategy = build_strategy(config)
    arrays = initial_arrays(config)
    before = evaluate_round(grid, strategy, arrays, 0, timeout=30)
    for server_round in (1, 2, 3):
        arrays, record = run_round(
            grid, strategy, arrays, server_round, timeout=30, policy=update_policy(config)
        )
    assert record.accuracy > before.accuracy + 0.05
    assert {client["name"] for client in record.clients} == {
        "cleveland",
        "hungary",
        "switzerland",
        "va-long-beach",
    }


def test_a_failing_client_is_counted_and_the_round_goes_on():
    config = heart_config()
    nodes = {**HOSPITALS, 99: {}}  # node 99 has neither a data file nor a partition
    grid = LocalGrid(client_app, config.to_mapping(), nodes)
    strategy = build_strategy(config)
    _, record = run_round(
        grid, strategy, initial_arrays(config), 1, timeout=30, policy=update_policy(config)
    )
    assert len(record.clients) == 4
    assert {(f["id"], f["stage"]) for f in record.failures} == {(99, "train"), (99, "evaluate")}
    assert "data-path" in record.failures[0]["reason"]


def test_a_round_where_every_client_fails_stops_the_run_loudly():
    config = heart_config(**{"num-clients": 2})
    grid = LocalGrid(client_app, config.to_mapping(), {1: {}, 2: {}})
    with pytest.raises(FederationError, match="round 1: no client returned a usable update"):
        run_round(
            grid,
            build_strategy(config),
            initial_arrays(config),
            1,
            timeout=30,
            policy=update_policy(config),
        )


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_each_strategy_changes_the_global_model(strategy):
    config = heart_config(strategy=strategy)
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    arrays = initial_arrays(config)
    new_arrays, _ = run_round(
        grid, build_strategy(config), arrays, 1, timeout=30, policy=update_policy(config)
    )
    before, after = arrays.to_torch_state_dict(), new_arrays.to_torch_state_dict()
    assert any(not before[key].equal(after[key]) for key in before)


def test_the_run_directory_records_every_round(tmp_path):
    config = heart_config(**{"run-dir": str(tmp_path)})
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    strategy = build_strategy(config)
    arrays = initial_arrays(config)
    recorder = RunRecorder(tmp_path, config)
    recorder.initial(evaluate_round(grid, strategy, arrays, 0, timeout=30))
    run_federation(
        grid, strategy, arrays, 2, 30, update_policy(config), on_round=recorder.round_finished
    )
    recorder.finish()

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [entry["round"] for entry in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert math.isfinite(entry["accuracy"]) and math.isfinite(entry["loss"])
        assert len(entry["clients"]) == 4
        assert {"id", "name", "num_examples", "accuracy"} <= set(entry["clients"][0])
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert weights.metadata()["round"] == "2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round-001.safetensors",
        "round-002.safetensors",
    ]
    assert (tmp_path / "accuracy_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
