"""Check every client update before it reaches the aggregate.

One NaN, one wrong shape or one update a hundred times too large poisons a plain average; a
coordinator that trusts replies blindly lets a single broken or hostile node wreck everyone's model.
Each check names its reason so the operator can see which node sent what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common.packed_arrays import is_packed, layout_of, unpack
from common.received_weights import ReceivedArrayError, ndarray


@dataclass(frozen=True)
class UpdatePolicy:
    max_update_norm: float  # L2 norm of (client weights - global weights); 0 disables the check
    norm_action: str  # "reject" the update, or "clip" it to the bound
    max_num_examples: int  # a larger claim would buy one node an outsized weight in the average


def _arrays(reply: Message) -> ArrayRecord:
    return next(iter(reply.content.array_records.values()))


def _num_examples(reply: Message) -> object:
    metrics = next(iter(reply.content.metric_records.values()), None)
    return None if metrics is None else metrics.get("num-examples")


def global_values(global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global model in float64, decoded once per round rather than once per reply."""
    return {name: ndarray(array).astype(np.float64) for name, array in global_arrays.items()}


def decode_like(name: str, received: Array, expected: Array) -> np.ndarray:
    """The received values, or ReceivedArrayError unless its .npy bytes are encoded exactly as
    the global array's: the same header (dtype, byte order, fortran order, shape) and size, and
    that header the one `np.save` writes for the dtype and shape both declare."""
    values = ndarray(received, name)  # header exactly as declared, data exactly that size
    header_length = len(received.data) - values.nbytes
    if (
        len(received.data) != len(expected.data)
        or received.data[:header_length] != expected.data[:header_length]
    ):
        raise ReceivedArrayError(f"'{name}': its .npy header differs from the global model's")
    return values


def screen_update(
    reply: Message,
    global_arrays: ArrayRecord,
    policy: UpdatePolicy,
    reference: dict[str, np.ndarray] | None = None,
) -> str | None:
    """None when the update may be aggregated (clipping it in place if needed), else the reason.
    `reference`: `global_values(global_arrays)`, when the caller screens many replies."""
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    count = _num_examples(reply)
    if isinstance(count, bool) or not isinstance(count, int | float) or not math.isfinite(count):
        return f"num-examples is {count!r}, not a number"
    if not 0 < count <= policy.max_num_examples or count != int(count):
        return f"num-examples {count!r} is not a whole number in 1..{policy.max_num_examples}"

    update = _arrays(reply)
    if is_packed(update):  # unpacked against the global model's layout, never the sender's
        try:
            update = unpack(update, layout_of(global_arrays))
        except ReceivedArrayError as error:
            return str(error)
        reply.content[next(iter(reply.content.array_records))] = update
    if set(update) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(update))[:3]
        extra = sorted(set(update) - set(global_arrays))[:3]
        return f"parameter names differ from the global model (missing {missing}, extra {extra})"
    bounded = policy.max_update_norm > 0  # only a norm bound needs the update's delta
    if reference is None and bounded:
        reference = global_values(global_arrays)
    deltas = {}
    for name, expected in global_arrays.items():
        received = update[name]
        if tuple(received.shape) != tuple(expected.shape) or received.dtype != expected.dtype:
            return (
                f"'{name}' is {received.dtype}{list(received.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        try:
            values = decode_like(name, received, expected)
        except ReceivedArrayError as error:
            return str(error)
        if not np.isfinite(values).all():
            return f"'{name}' holds NaN or infinite values"
        if bounded:
            deltas[name] = values.astype(np.float64) - reference[name]

    if not bounded:
        return None
    norm = math.sqrt(sum(float(np.sum(delta * delta)) for delta in deltas.values()))
    if norm <= policy.max_update_norm:
        return None
    if policy.norm_action == "reject":
        return f"update norm {norm:.3g} exceeds the bound {policy.max_update_norm:g}"
    scale = policy.max_update_norm / norm
    clipped = {
        name: Array((reference[name] + delta * scale).astype(np.dtype(global_arrays[name].dtype)))
        for name, delta in deltas.items()
    }
    key = next(iter(reply.content.array_records))
    reply.content[key] = ArrayRecord(clipped)
    return None
