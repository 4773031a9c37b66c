"""Client-level DP at the coordinator: Flower's server-side fixed clipping with its RDP accountant."""

from __future__ import annotations

import pytest
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.app import app as client_app
from common.run_config import RunConfig, RunConfigError
from server.app import update_policy
from server.federation import run_round
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid
from tests.test_update_validation import HOSPITALS, global_arrays


def run(config: RunConfig, rounds: int) -> list[dict]:
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    strategy, arrays = build_strategy(config), global_arrays(config)
    records = []
    for server_round in range(1, rounds + 1):
        arrays, record = run_round(grid, strategy, arrays, server_round, 30, update_policy(config))
        records.append(record.as_json())
    return records


def test_client_level_epsilon_is_reported_each_round_and_grows():
    config = RunConfig.from_mapping({"client-dp": True, "local-epochs": 1})
    records = run(config, rounds=2)
    spent = [r["client_level_privacy"]["epsilon"] for r in records]
    assert 0 < spent[0] < spent[1] <= config.client_dp_max_epsilon
    assert records[0]["client_level_privacy"]["delta"] == config.target_delta


def test_the_coordinator_refuses_a_round_that_would_exceed_max_epsilon():
    config = RunConfig.from_mapping(
        {"client-dp": True, "local-epochs": 1, "client-dp-max-epsilon": 1.0}
    )
    with pytest.raises(PrivacyBudgetExhausted, match="would exceed max_epsilon"):
        run(config, rounds=1)


def test_client_level_dp_needs_a_plain_average():
    with pytest.raises(RunConfigError, match="client-dp = true needs strategy 'fedavg'"):
        RunConfig.from_mapping({"client-dp": True, "strategy": "fedmedian"})
