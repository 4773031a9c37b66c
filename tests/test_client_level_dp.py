"""Client-level DP at the coordinator: Flower's server-side fixed clipping with its RDP accountant."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.app import app as client_app
from common.run_config import RunConfig, RunConfigError
from server.app import update_policy
from server.federation import run_round
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid, named_arrays
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


def observe(config: RunConfig, rounds: int) -> tuple[list[list[float]], list[dict]]:
    """Each round's records, and the norm of every update as the coordinator received it."""
    strategy, arrays = build_strategy(config), global_arrays(config)
    norms: list[list[float]] = []

    def measure(node, message, reply):
        if message.metadata.message_type == "train" and not reply.has_error():
            sent = named_arrays(message.content["arrays"], config).to_numpy_ndarrays()
            received = named_arrays(reply.content["arrays"], config).to_numpy_ndarrays()
            squares = sum(np.sum((r - s) ** 2) for r, s in zip(received, sent, strict=True))
            norms[-1].append(float(np.sqrt(squares)))
        return reply

    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS, tamper=measure)
    records = []
    for server_round in range(1, rounds + 1):
        norms.append([])
        arrays, record = run_round(grid, strategy, arrays, server_round, 30, update_policy(config))
        records.append(record.as_json())
    return norms, records


def test_client_side_clipping_means_the_coordinator_never_sees_an_unclipped_update():
    overrides = {"client-dp": True, "local-epochs": 1, "client-dp-clipping-norm": 0.05}
    unclipped, _ = observe(RunConfig.from_mapping({**overrides, "client-dp-clipping": "server"}), 1)
    clipped, records = observe(
        RunConfig.from_mapping({**overrides, "client-dp-clipping": "client"}), 1
    )
    assert len(clipped[0]) == len(HOSPITALS) and min(unclipped[0]) > 0.05  # work for the clipper
    assert max(clipped[0]) <= 0.05 * (1 + 1e-5)
    assert records[0]["client_level_privacy"]["epsilon"] > 0
    assert records[0]["client_level_privacy"]["clipping_norm"] == 0.05


def test_adaptive_client_side_clipping_clips_to_a_norm_learned_each_round():
    config = RunConfig.from_mapping(
        {
            "client-dp": True,
            "local-epochs": 1,
            "client-dp-clipping": "adaptive",
            "client-dp-clipping-norm": 0.01,
        }
    )
    norms, records = observe(config, rounds=2)
    learned = records[0]["client_level_privacy"]["clipping_norm"]  # the norm for round 2
    assert learned != 0.01
    assert max(norms[0]) <= 0.01 * (1 + 1e-5)
    assert max(norms[1]) <= learned * (1 + 1e-5)
    assert "epsilon" not in records[0]["client_level_privacy"]  # Flower gives it no accountant


def test_client_side_clipping_leaves_runs_without_client_dp_alone():
    config = RunConfig.from_mapping({"local-epochs": 1, "client-dp-clipping": "client"})
    records = run(config, rounds=1)
    assert records[0]["failed"] == 0 and "client_level_privacy" not in records[0]
