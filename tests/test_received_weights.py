"""Specifications for reading received weights: the same tensors as Flower's own reader, faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.model_factory import build_model
from common.received_weights import torch_state_dict
from common.run_config import RunConfig
from common.tasks import task_schema


def same_tensors(ours: dict[str, torch.Tensor], flowers: dict[str, torch.Tensor]) -> bool:
    return list(ours) == list(flowers) and all(
        ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor)
        for name, tensor in flowers.items()
    )


@pytest.mark.parametrize("task", ["bank", "banking77"])
def test_a_models_weights_read_back_exactly_as_flower_reads_them(task: str) -> None:
    config = RunConfig.from_mapping({"task": task})
    record = ArrayRecord(build_model(task_schema(config), config).state_dict())
    assert same_tensors(torch_state_dict(record), record.to_torch_state_dict())


def test_arrays_outside_the_fast_path_still_read_correctly() -> None:
    record = ArrayRecord(
        {
            "fortran": Array(np.asfortranarray(np.arange(12.0).reshape(3, 4))),
            "scalar": Array(np.array(3.0, dtype=np.float32)),
            "empty": Array(np.zeros((0, 3), dtype=np.float32)),
            "integers": Array(np.arange(5, dtype=np.int64)),
        }
    )
    assert same_tensors(torch_state_dict(record), record.to_torch_state_dict())


def test_the_weights_are_the_models_own_writable_copy() -> None:
    record = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    tensor = torch_state_dict(record)["w"]
    tensor += 1
    assert torch.equal(torch_state_dict(record)["w"], torch.ones(3))
