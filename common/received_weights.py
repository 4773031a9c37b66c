"""Received model weights (a Flower `ArrayRecord`) decoded strictly, in place, without `np.load`.

Flower stores each array as an .npy file in bytes and reads it back with `np.load`, whose header
parsing (`ast.literal_eval`) dominates for small models: for the 40 tensors of the tabular
Transformer, `ArrayRecord.to_torch_state_dict` took 11 ms against 2 ms here (bench/results/scale.md),
paid twice per client-round (train and evaluate), more than the training itself at 1,000 clients;
the coordinator pays it again when it screens every reply (server/update_validation.py).

An `Array` carries its declared dtype and shape beside the .npy bytes, and the two can disagree: a
reply declaring float32[32] whose header says one float. So nothing is read from the header; the
header must be, byte for byte, the one `np.save` writes for the declared dtype and shape (which
fixes dtype, byte order, fortran order and shape at once), and the data after it must be exactly
that many bytes. Anything else raises `ReceivedArrayError` naming what differs; there is no
fallback to a more lenient reader.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# Numbers only: no objects (pickles), strings, records or datetimes travel as model weights.
NUMERIC_KINDS = frozenset("biufc")
NUMPY_STYPE = "numpy.ndarray"


class ReceivedArrayError(ValueError):
    """A received array whose bytes do not hold exactly what it declares; names the difference."""


def torch_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(ndarray(array, name)) for name, array in record.items()}


class LastDecoded:
    """`torch_state_dict` of the last record, decoded again only when a record differs from it in
    a name, a declaration (types included: 32.0 == 32) or a byte: a simulation worker receives the
    same global model from every client it serves in a round (500 copies at 1,000 clients on 2
    cores), and decoding its 40 tensors cost as much as copying them into the model (0.2 ms, twice
    per client-round). The tensors are shared between calls: copy from them, never into them."""

    def __init__(self) -> None:
        self._key: tuple[tuple[object, ...], ...] = ()
        self._tensors: dict[str, torch.Tensor] = {}

    def __call__(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        if not all(type(array.data) is bytes for array in record.values()):
            return torch_state_dict(record)  # refuses it, naming the array
        key = tuple(
            (name, array.stype, type(array.dtype), array.dtype,
             tuple(map(type, array.shape)), tuple(array.shape), array.data)
            for name, array in record.items()
        )  # fmt: skip
        if not key or key != self._key:
            self._tensors = torch_state_dict(record)  # raises before the key is kept
            self._key = key
        return self._tensors


@lru_cache(maxsize=4096)
def npy_header(dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool = False) -> bytes:
    """The exact header `np.save` writes for this dtype and shape (cached: models repeat them)."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": fortran_order,
        "shape": shape,
    }
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, fields)
    except ValueError:  # header over 64 KiB: np.save switches to version 2.0 as well
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, fields)
    return buffer.getvalue()


@lru_cache(maxsize=4096)
def expected_layout(dtype_text: str, shape: tuple[int, ...]) -> tuple[np.dtype, bytes, bytes, int]:
    """(dtype, C-order header, Fortran-order header, data bytes) for a declared dtype and shape,
    once per distinct declaration (a model repeats them every round)."""
    try:
        dtype = np.dtype(dtype_text)
    except Exception:  # NumPy's dtype parser raises many kinds (even SyntaxError, for ",")
        raise ReceivedArrayError(f"declares dtype {dtype_text!r}, not a numeric dtype") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ReceivedArrayError(f"declares dtype {dtype_text!r}, not a numeric dtype")
    if len(shape) > 32:  # NumPy's own limit on dimensions
        raise ReceivedArrayError(f"declares {len(shape)} dimensions, more than NumPy allows")
    nbytes = math.prod(shape) * dtype.itemsize
    return dtype, npy_header(dtype, shape, False), npy_header(dtype, shape, True), nbytes


def declared_layout(array: Array) -> tuple[np.dtype, tuple[int, ...], bytes, bytes, int]:
    """What the message declares, checked to be plain numbers of a sane shape."""
    if array.stype != NUMPY_STYPE:
        raise ReceivedArrayError(f"serialised as {array.stype!r}, not {NUMPY_STYPE!r}")
    shape = tuple(array.shape)
    # `type(...) is int`: True and 1 hash alike, and a bool is no dimension. (`map`, not a
    # generator: this runs for every array of every message, both ways.)
    if not set(map(type, shape)) <= {int} or min(shape, default=0) < 0:
        raise ReceivedArrayError(f"declares shape {list(shape)!r}, not non-negative integers")
    if not isinstance(array.dtype, str):
        raise ReceivedArrayError(f"declares dtype {array.dtype!r}, not a numeric dtype")
    return (shape, *expected_layout(array.dtype, shape))  # type: ignore[return-value]


def ndarray(array: Array, name: str = "array") -> np.ndarray:
    """The array's values as a writable copy, or ReceivedArrayError if its bytes disagree with
    its declaration. C order is what Flower sends; Fortran order only from a Fortran ndarray."""
    try:
        shape, dtype, c_header, f_header, nbytes = declared_layout(array)
        data = array.data
        if not isinstance(data, bytes):
            raise ReceivedArrayError("holds no bytes")
        if data.startswith(c_header):
            header, order = c_header, "C"
        elif data.startswith(f_header):
            header, order = f_header, "F"
        else:
            raise ReceivedArrayError(_header_difference(data, dtype, shape))
        if len(data) != len(header) + nbytes:
            raise ReceivedArrayError(
                f"holds {len(data) - len(header)} data bytes, {dtype}{list(shape)} needs {nbytes}"
            )
    except ReceivedArrayError as error:
        raise ReceivedArrayError(f"'{name}': {error}") from None
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=len(header))
    return values.reshape(shape, order=order).copy(order=order)  # writable: the model's own copy


def _header_difference(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> str:
    """What the header says instead, for the operator; parsed only on this rejection path."""
    expected = f"{dtype.str}{list(shape)}"
    if not data.startswith(np.lib.format.MAGIC_PREFIX):
        return f"is not an .npy array (declared {expected})"
    try:
        stream = io.BytesIO(data)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(stream)]  # fmt: skip
        found_shape, fortran_order, found_dtype = read(stream, max_header_size=10_000)
    except Exception:  # NumPy's header parser raises many kinds on malformed text; all mean that
        return f"has a malformed .npy header (declared {expected})"
    found = f"{found_dtype.str}{list(found_shape)}{', Fortran order' if fortran_order else ''}"
    return f"its .npy header says {found}, the message declares {expected}"
