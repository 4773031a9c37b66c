"""A stopped run stops the site's work. Each message lives one round (server/federation.py
`outgoing`); past that, nobody takes the reply, so a site neither starts nor finishes training
for it, and a DP site charges its ledger nothing for a round it never began.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.constant import ErrorCode
from torch import nn

from client.app import app as client_app
from client.training import RoundExpired, train_epochs
from common.model_factory import build_model
from common.run_config import RunConfig
from common.tasks import task_schema
from server.federation import outgoing
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid
from tests.test_forged_arrays import task_identity  # noqa: F401  (fixture)


class SlowLoader:
    """Batches that take `seconds` each to arrive, as on a busy site."""

    def __init__(self, batches: int, seconds: float) -> None:
        self.batches, self.seconds, self.drawn = batches, seconds, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            time.sleep(self.seconds)
            self.drawn += 1
            yield torch.randn(4, 3), torch.randint(0, 2, (4,))


def test_training_stops_at_the_first_batch_past_the_deadline():
    model = nn.Linear(3, 2)
    loader = SlowLoader(batches=100, seconds=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RoundExpired, match="time to live ran out"):
        train_epochs(model, loader, optimizer, 1, torch.device("cpu"), deadline=time.time() + 0.5)
    assert 1 <= loader.drawn < 50  # stopped about 0.5 s in, not after all 100 batches


def one_stale_message(config: RunConfig, sent_seconds_ago: float, kind: str = "train") -> tuple:
    grid = LocalGrid(client_app, config.to_mapping(), {1: {"partition-id": 0}})
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    strategy = build_strategy(config)
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    (message,) = outgoing(configure(1, arrays, ConfigRecord(), grid), arrays, grid, timeout=60)
    message.metadata.created_at -= sent_seconds_ago
    return grid, message


def test_a_dp_site_neither_trains_nor_evaluates_nor_charges_once_the_round_is_over(tmp_path):
    config = RunConfig.from_mapping(
        {"num-server-rounds": 1, "local-epochs": 1, "dp": True, "target-epsilon": 3.0,
         "batch-size": 8, "run-dir": str(tmp_path)}
    )  # fmt: skip
    grid, stale = one_stale_message(config, sent_seconds_ago=61)
    (reply,) = grid.send_and_receive([stale])
    assert reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert "time to live ran out" in reply.error.reason
    assert not list((tmp_path / "privacy-ledgers").glob("*.json"))  # nothing charged

    grid, stale = one_stale_message(config, sent_seconds_ago=61, kind="evaluate")
    (reply,) = grid.send_and_receive([stale])
    assert reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert not list((tmp_path / "privacy-ledgers").glob("*.json"))  # nor for a late evaluation

    grid, live = one_stale_message(config, sent_seconds_ago=0)
    (reply,) = grid.send_and_receive([live])
    assert not reply.has_error(), reply.error.reason
    assert list((tmp_path / "privacy-ledgers").glob("*.json"))  # the live round is charged


def test_a_site_without_dp_does_not_train_for_a_round_that_is_already_over():
    config = RunConfig.from_mapping({"num-server-rounds": 1, "local-epochs": 1})
    grid, stale = one_stale_message(config, sent_seconds_ago=61)
    (reply,) = grid.send_and_receive([stale])
    assert reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
