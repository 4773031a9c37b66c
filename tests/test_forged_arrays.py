"""Forged arrays never reach the aggregate: the .npy bytes must hold exactly what is declared.

Property-based (hypothesis): forged headers, payloads and declarations, each screened with and
without a norm bound. Every case must be rejected with a reason, never accepted, never raise.
The case counts add up to well over 1,000 (`FORGERIES` per property).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.received_weights import ReceivedArrayError, ndarray, npy_header
from server.update_validation import UpdatePolicy, screen_update

FORGERIES = 400
CASES = settings(
    max_examples=FORGERIES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
POLICIES = (UpdatePolicy(0.0, "reject", 1000), UpdatePolicy(1e6, "clip", 1000))
GLOBAL = ArrayRecord(
    {
        "weight": Array(np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)),
        "bias": Array(np.zeros(8, dtype=np.float32)),
    }
)
NAMES = list(GLOBAL)


@pytest.fixture(autouse=True, scope="module")
def task_identity() -> None:
    """Flower's Message needs a task identity, as inside a ServerApp (tests/local_grid.py)."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def reply_with(name: str, forged: Array) -> Message:
    arrays = ArrayRecord({n: forged if n == name else GLOBAL[n] for n in NAMES})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, dst_node_id=1, message_type="train")


def assert_rejected(name: str, forged: Array) -> None:
    for policy in POLICIES:
        reason = screen_update(reply_with(name, forged), GLOBAL, policy)
        assert reason is not None, f"forgery accepted under {policy}"
        assert isinstance(reason, str) and reason


def declared_like(name: str, data: bytes) -> Array:
    expected = GLOBAL[name]
    return Array(dtype=expected.dtype, shape=tuple(expected.shape), stype=expected.stype, data=data)


# ------------------------------------------------------------------------------ the reported case


def test_a_reply_declaring_float32_32_that_holds_one_float_is_rejected():
    forged = Array(dtype="float32", shape=(32,), stype="numpy.ndarray",
                   data=npy(np.array([7.0], dtype=np.float32)))  # fmt: skip
    record = ArrayRecord({"w": Array(np.zeros(32, dtype=np.float32))})
    for policy in (UpdatePolicy(0.0, "reject", 100), UpdatePolicy(5.0, "reject", 100)):
        content = RecordDict(
            {"arrays": ArrayRecord({"w": forged}), "metrics": MetricRecord({"num-examples": 3})}
        )
        reason = screen_update(Message(content=content, dst_node_id=1, message_type="train"),
                               record, policy)  # fmt: skip
        assert reason == "'w': its .npy header says <f4[1], the message declares <f4[32]"


def test_the_header_is_the_one_numpy_writes():
    for values in (np.zeros((3, 4), np.float32), np.arange(5), np.array(2.0), np.zeros((0, 2))):
        assert npy(values).startswith(npy_header(values.dtype, values.shape))
    wide = np.zeros((1,) * 32, np.float32)
    assert npy(wide).startswith(npy_header(wide.dtype, wide.shape))


def test_a_genuine_update_with_new_values_is_accepted():
    update = ArrayRecord({n: Array(GLOBAL[n].numpy() + np.float32(0.5)) for n in NAMES})
    content = RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 10})})
    reply = Message(content=content, dst_node_id=1, message_type="train")
    assert screen_update(reply, GLOBAL, POLICIES[0]) is None


# ------------------------------------------------------------------------------ properties

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", "<i8", "|u1", "|b1", "<c8"])


@CASES
@given(name=st.sampled_from(NAMES), dtype=dtypes, shape=shapes, fortran=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_a_header_describing_another_array_is_rejected(name, dtype, shape, fortran, seed):
    """Declared as the global array, the bytes hold any other well-formed .npy array."""
    values = np.random.default_rng(seed).normal(size=shape).astype(np.dtype(dtype))
    if fortran:
        values = np.asfortranarray(values)
    data = npy(values)
    if data == npy(GLOBAL[name].numpy()) or (
        values.dtype == np.float32 and values.shape == tuple(GLOBAL[name].shape)
        and not (fortran and values.ndim > 1)
    ):  # fmt: skip
        return  # a genuine encoding of the declared array, not a forgery
    assert_rejected(name, declared_like(name, data))


@CASES
@given(name=st.sampled_from(NAMES), position=st.integers(0, 127), byte=st.integers(0, 255),
       cut=st.integers(-40, 40))  # fmt: skip
def test_a_tampered_header_or_a_resized_payload_is_rejected(name, position, byte, cut):
    genuine = bytearray(GLOBAL[name].data)
    header_length = len(npy_header(np.dtype(np.float32), tuple(GLOBAL[name].shape)))
    position %= header_length
    if genuine[position] == byte and cut == 0:
        return  # identical to the genuine encoding
    genuine[position] = byte
    data = bytes(genuine)
    data = data[:cut] if cut < 0 else data + b"\0" * cut
    assert_rejected(name, declared_like(name, data))


@CASES
@given(
    name=st.sampled_from(NAMES),
    dtype=st.one_of(dtypes, st.text(max_size=8), st.sampled_from(["object", "|O", "<U4", "V8"])),
    shape=st.lists(st.one_of(st.integers(-3, 2**40), st.booleans()), max_size=5),
    stype=st.sampled_from(["numpy.ndarray", "torch.tensor", ""]),
    data=st.one_of(st.binary(max_size=300), st.builds(npy, st.just(np.zeros(3, np.float32)))),
)
@example(  # found by hypothesis: NumPy's dtype parser raised SyntaxError on ","
    name="weight", dtype=",", shape=[], stype="numpy.ndarray", data=npy(np.zeros(3, np.float32))
)
def test_any_declaration_and_any_bytes_never_raise_and_never_pass_as_another(
    name, dtype, shape, stype, data
):
    """Arbitrary declaration and bytes: a ReceivedArrayError at most, and never accepted unless
    they are exactly the genuine encoding of the global array's dtype and shape."""
    forged = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
    try:
        ndarray(forged)
    except ReceivedArrayError:
        pass
    genuine = GLOBAL[name]
    if (dtype, tuple(shape), stype) == (genuine.dtype, tuple(genuine.shape), genuine.stype) and (
        data == genuine.data
    ):
        return
    for policy in POLICIES:
        reason = screen_update(reply_with(name, forged), GLOBAL, policy)
        if reason is None:  # only a different, genuinely encoded value of the declared array
            decoded = ndarray(forged)
            assert data.startswith(npy_header(np.dtype(np.float32), tuple(genuine.shape)))
            assert decoded.shape == tuple(genuine.shape)


def test_an_object_array_is_never_unpickled():
    with pytest.raises(ReceivedArrayError, match="not a numeric dtype"):
        ndarray(Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"\x80\x04."))
