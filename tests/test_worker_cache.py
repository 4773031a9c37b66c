"""Specifications for what a client process pays once, not per message: run config and model."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from client.app import _received_model
from client.app import app as client_app
from common.model_factory import build_model
from common.run_config import RunConfig, cached_run_config
from common.tasks import task_schema
from tests.local_grid import LocalGrid


def test_an_equal_run_config_is_validated_once() -> None:
    settings = RunConfig.from_mapping({"seed": 3}).to_mapping()
    assert cached_run_config(settings) is cached_run_config(dict(settings))
    assert cached_run_config({**settings, "seed": 4}).seed == 4


def weights_message(config: RunConfig, seed: int) -> Message:
    LocalGrid(client_app, {}, {})  # sets the task identity a Message needs
    torch.manual_seed(seed)
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    return Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type=MessageType.TRAIN)


def test_each_message_loads_its_weights_into_the_same_model() -> None:
    config = RunConfig.from_mapping({})
    first = _received_model(weights_message(config, 1), config)
    received = weights_message(config, 2)
    second = _received_model(received, config)
    assert second is first
    expected = received.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(second.state_dict()[k], v) for k, v in expected.items())


def test_dp_training_gets_a_fresh_model_for_opacus_to_wrap() -> None:
    config = RunConfig.from_mapping({})
    message = weights_message(config, 1)
    assert _received_model(message, config, fresh=True) is not _received_model(message, config)
