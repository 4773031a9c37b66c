"""The packed model: one array on the wire, unpacked only against the receiver's own layout.

A packed reply is decoded as strictly as named arrays: it must be one uint8 array of exactly the
bytes the coordinator's global model needs; anything else is rejected with a reason and never
reaches the aggregate. The real ClientApp answers a packed request packed and a named one named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.superlink.grid import InMemoryGrid
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from common.model_factory import build_model
from common.packed_arrays import PACKED_KEY, array_record, is_packed, layout_of, pack, unpack
from common.received_weights import ReceivedArrayError
from common.run_config import RunConfig
from common.tasks import task_schema
from server.federation import outgoing
from server.strategy_choice import build_strategy
from server.update_validation import UpdatePolicy, screen_update
from tests.local_grid import LocalGrid
from tests.test_forged_arrays import GLOBAL, task_identity  # noqa: F401  (fixture)

POLICY = UpdatePolicy(0.0, "reject", 1000)
MIXED = ArrayRecord(
    {
        "weight": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "steps": Array(np.array([7], dtype=np.int64)),
        "half": Array(np.array([0.5, -2.0], dtype=np.float16)),
    }
)


def reply_with(arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_array_record_writes_the_bytes_flower_writes():
    """The replies' fast encoder: the same names, declarations and .npy bytes as
    `ArrayRecord(tensors)` (np.save), for any dtype and shape; a strided tensor in C order."""
    tensors = {
        "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "transposed": torch.arange(6, dtype=torch.float64).reshape(2, 3).t(),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    fast, flower = array_record(tensors), ArrayRecord(tensors)
    assert list(fast) == list(flower)
    for name, array in flower.items():
        assert (fast[name].dtype, fast[name].shape, fast[name].stype) == (
            array.dtype, array.shape, array.stype,
        )  # fmt: skip
        assert np.array_equal(fast[name].numpy(), array.numpy())
        if tensors[name].is_contiguous():
            assert fast[name].data == array.data


def test_packing_round_trips_every_dtype_and_shape_in_one_array():
    wire = pack(MIXED)
    assert list(wire) == [PACKED_KEY] and is_packed(wire)
    assert wire[PACKED_KEY].dtype == "uint8"
    back = unpack(wire, layout_of(MIXED))
    assert list(back) == list(MIXED)
    for name in MIXED:  # byte for byte the .npy Flower itself writes for the array
        assert back[name].data == MIXED[name].data
        assert (back[name].dtype, tuple(back[name].shape)) == (MIXED[name].dtype, MIXED[name].shape)


@pytest.mark.parametrize(
    "forged, reason",
    [
        (ArrayRecord({PACKED_KEY: Array(np.zeros(10, np.uint8))}), "needs uint8[160]"),
        (ArrayRecord({PACKED_KEY: Array(np.zeros(161, np.uint8))}), "needs uint8[160]"),
        (ArrayRecord({PACKED_KEY: Array(np.zeros(40, np.float32))}), "float32[40]"),
        (ArrayRecord({PACKED_KEY: Array(np.zeros((2, 80), np.uint8))}), "uint8[2, 80]"),
        (
            ArrayRecord({PACKED_KEY: Array(np.zeros(160, np.uint8)), "bias": GLOBAL["bias"]}),
            "one array",
        ),
    ],
    ids=["short", "long", "float32", "two-dimensional", "extra array"],
)
def test_a_forged_packed_reply_is_rejected_with_its_reason(forged, reason):
    assert reason in (screen_update(reply_with(forged), GLOBAL, POLICY) or "")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_packed_bytes_of_any_length_but_the_right_one_never_pass(payload):
    reason = screen_update(
        reply_with(ArrayRecord({PACKED_KEY: Array(np.frombuffer(payload, np.uint8))})),
        GLOBAL,
        POLICY,
    )
    assert (reason is None) == (len(payload) == 160)


def test_an_honest_packed_reply_is_screened_as_the_named_arrays():
    honest = ArrayRecord({n: Array(GLOBAL[n].numpy() + 0.1) for n in GLOBAL})
    reply = reply_with(pack(honest))
    assert screen_update(reply, GLOBAL, POLICY) is None
    screened = reply.content["arrays"]  # what the strategy aggregates
    assert list(screened) == list(GLOBAL)
    np.testing.assert_array_equal(screened["weight"].numpy(), honest["weight"].numpy())
    with pytest.raises(ReceivedArrayError, match="needs uint8"):
        unpack(pack(honest), layout_of(MIXED))  # never by the sender's layout


def test_the_client_app_answers_packed_requests_packed_and_named_ones_named():
    config = RunConfig.from_mapping({"num-server-rounds": 1, "local-epochs": 1})
    grid = LocalGrid(client_app, config.to_mapping(), {1: {"partition-id": 0}})
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())

    def one_reply(pack_it: bool) -> ArrayRecord:
        messages = build_strategy(config).configure_train(1, arrays, ConfigRecord(), grid)
        (reply,) = grid.send_and_receive(
            outgoing(messages, arrays, grid, timeout=60) if pack_it else messages
        )
        assert not reply.has_error(), reply.error.reason
        return reply.content["arrays"]

    as_packed, as_named = one_reply(True), one_reply(False)
    assert list(as_packed) == [PACKED_KEY]
    assert list(as_named) == list(arrays)
    assert list(unpack(as_packed, layout_of(arrays))) == list(arrays)


def test_a_simulation_hands_the_model_over_as_named_arrays():
    """Flower's in-memory grid moves messages as objects: packing there would only cost."""
    in_memory = object.__new__(InMemoryGrid)  # its type is what counts; no LinkState needed
    message = Message(RecordDict({"arrays": GLOBAL}), dst_node_id=1, message_type="train")
    (sent,) = outgoing([message], GLOBAL, in_memory, timeout=60)
    assert list(sent.content["arrays"]) == list(GLOBAL)


def test_a_site_refuses_a_packed_model_that_is_not_its_own_layout(tmp_path):
    """A hostile coordinator's packed model one float short: the site unpacks against its own
    model, so it answers with an error, trains nothing and charges nothing to its ledger."""
    config = RunConfig.from_mapping(
        {"num-server-rounds": 1, "local-epochs": 1, "dp": True, "target-epsilon": 3.0,
         "batch-size": 8, "run-dir": str(tmp_path)}
    )  # fmt: skip
    grid = LocalGrid(client_app, config.to_mapping(), {1: {"partition-id": 0}})
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    messages = build_strategy(config).configure_train(1, arrays, ConfigRecord(), grid)
    (message,) = outgoing(messages, arrays, grid, timeout=60)
    wire = message.content["arrays"]
    message.content["arrays"] = ArrayRecord({PACKED_KEY: Array(wire[PACKED_KEY].numpy()[:-4])})
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "the model needs uint8" in reply.error.reason
    ledgers = tmp_path / "privacy-ledgers"
    assert not list(ledgers.glob("*.json"))  # nothing charged

    message.content["arrays"] = wire  # the honest model is trained on, and charged
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error(), reply.error.reason
    assert list(ledgers.glob("*.json"))
