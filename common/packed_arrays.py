"""A model's arrays packed into one array for the wire, and unpacked strictly against a layout.

Flower sends every array of a message as its own objects, one HTTP request each on both hops
(SuperLink to SuperNode over TLS behind nginx, SuperNode to the site's executor): about 80
requests per message for the 40 tensors of the tabular Transformer, 1.7-2 s of a deployed
round's overhead per message on this machine (BENCHMARKS.md, "Pinned site executor"). Packed,
a message carries one array whatever the model. The receiver never trusts the sender's idea of
the layout: it unpacks against its own (the coordinator's global model, the site's own model),
and the packed array must be exactly the bytes that layout needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.flower_compat import declared_array
from common.received_weights import NUMPY_STYPE, ReceivedArrayError, ndarray, npy_header

PACKED_KEY = "confide.packed"


@dataclass(frozen=True)
class Slot:
    """One tensor of the model: where its values sit in the packed bytes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Layout = Sequence[Slot]


def layout_of(record: ArrayRecord) -> tuple[Slot, ...]:
    """The layout of arrays this process made itself (its global or its own model)."""
    return tuple(Slot(name, np.dtype(a.dtype), tuple(a.shape)) for name, a in record.items())


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_KEY in record


def npy_array(dtype: np.dtype, shape: tuple[int, ...], data: bytes) -> Array:
    """An Array holding `data` (C order) as `np.save` writes it, from the cached header: Flower's
    `Array(ndarray)` runs `np.save` into a BytesIO per array: 0.6 ms for the 40 tensors of a
    reply (BENCHMARKS.md, "Confide's own cost per client-round")."""
    return declared_array(dtype_text(dtype), shape, NUMPY_STYPE, npy_header(dtype, shape) + data)


@lru_cache(maxsize=64)
def dtype_text(dtype: np.dtype) -> str:
    """`str(dtype)`, as Flower declares it, once per dtype (NumPy builds the text in Python)."""
    return str(dtype)


def holding(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord of these very Arrays: `ArrayRecord(dict)` builds a copy of each."""
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array
    return record


def array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(tensors)`, the same arrays and bytes (C order), without `np.save`."""
    arrays = {}
    for name, tensor in tensors.items():
        values = tensor.detach().cpu().numpy()
        arrays[name] = npy_array(values.dtype, values.shape, values.tobytes())  # C order
    return holding(arrays)


def pack(record: ArrayRecord) -> ArrayRecord:
    """Every array's bytes, in the record's order, as one uint8 array."""
    parts = [np.ascontiguousarray(ndarray(array, name)).view(np.uint8).ravel()
             for name, array in record.items()]  # fmt: skip
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return ArrayRecord({PACKED_KEY: Array(flat)})


def unpack(record: ArrayRecord, layout: Layout) -> ArrayRecord:
    """The named arrays of `layout`, cut from the packed bytes; ReceivedArrayError unless the
    record holds exactly one packed uint8 array of exactly the bytes the layout needs."""
    if list(record.keys()) != [PACKED_KEY]:
        raise ReceivedArrayError(f"a packed model holds one array '{PACKED_KEY}' and nothing else")
    flat = ndarray(record[PACKED_KEY], PACKED_KEY)
    needed = sum(slot.nbytes for slot in layout)
    if flat.dtype != np.uint8 or flat.ndim != 1 or flat.size != needed:
        raise ReceivedArrayError(
            f"'{PACKED_KEY}': {flat.dtype}{list(flat.shape)}, the model needs uint8[{needed}]"
        )
    data, arrays, offset = flat.tobytes(), {}, 0
    for slot in layout:
        arrays[slot.name] = npy_array(slot.dtype, slot.shape, data[offset : offset + slot.nbytes])
        offset += slot.nbytes
    return holding(arrays)
