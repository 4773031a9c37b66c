"""Specifications for reading received weights: the same tensors as Flower's own reader, faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.model_factory import build_model
from common.received_weights import LastDecoded, ReceivedArrayError, torch_state_dict
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


def copy_of(record: ArrayRecord) -> ArrayRecord:
    """The same declarations and bytes in new objects, as every message brings them."""
    copied = ArrayRecord()
    for name, array in record.items():
        copied[name] = Array(array.dtype, tuple(array.shape), array.stype, bytes(array.data))
    return copied


def test_the_same_record_again_is_decoded_once_and_any_difference_decodes_it_anew() -> None:
    record = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    decoded = LastDecoded()
    first = decoded(record)
    assert decoded(copy_of(record)) is first
    assert same_tensors(first, record.to_torch_state_dict())
    other = ArrayRecord({"w": Array(np.arange(1, 7, dtype=np.float32).reshape(2, 3))})
    assert same_tensors(decoded(other), other.to_torch_state_dict())
    renamed = ArrayRecord({"v": Array(np.arange(1, 7, dtype=np.float32).reshape(2, 3))})
    assert list(decoded(renamed)) == ["v"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("shape", (2.0, 3)),  # equal to (2, 3), yet not a shape
        ("dtype", np.dtype("float32")),  # equal to "float32", yet not a declared dtype text
        ("shape", (3, 2)),  # the header says (2, 3)
        ("data", b"\x93NUMPY"),  # not the declared bytes
    ],
)
def test_a_record_that_differs_from_the_last_one_in_any_way_is_checked_in_full(
    field: str, value: object
) -> None:
    record = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    decoded = LastDecoded()
    decoded(record)
    bad = copy_of(record)
    setattr(bad["w"], field, value)
    with pytest.raises(ReceivedArrayError):
        decoded(bad)
    assert same_tensors(decoded(copy_of(record)), record.to_torch_state_dict())
