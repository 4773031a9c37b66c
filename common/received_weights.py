"""Received model weights (a Flower `ArrayRecord`) as a torch state dict, without `np.load`.

Flower stores each array as an .npy file in bytes and reads it back with `np.load`, whose header
parsing (`ast.literal_eval`) dominates for small models: for the 40 tensors of the tabular
Transformer, `ArrayRecord.to_torch_state_dict` took 11 ms against 2 ms here (bench/results/scale.md),
paid twice per client-round (train and evaluate), more than the training itself at 1,000 clients;
the coordinator pays it again when it screens every reply (server/update_validation.py).
The `Array` already carries dtype and shape, and an .npy file ends with its raw data, so the data is
read in place. Anything this fast path does not recognise (Fortran order, other byte order, not an
.npy) goes through Flower's own reader.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NPY_MAGIC = b"\x93NUMPY"


def torch_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(ndarray(array)) for name, array in record.items()}


def ndarray(array: Array) -> np.ndarray:
    """`array.numpy()`, reading the data in place when it is a plain .npy."""
    dtype = np.dtype(array.dtype)
    count = math.prod(array.shape)
    header_length = len(array.data) - count * dtype.itemsize
    header = array.data[:header_length] if header_length > 0 else b""
    if (
        array.stype == "numpy.ndarray"
        and header.startswith(NPY_MAGIC)
        and f"'descr': '{dtype.str}'".encode() in header
        and b"'fortran_order': False" in header
    ):
        data = np.frombuffer(array.data, dtype=dtype, count=count, offset=header_length)
        return data.reshape(array.shape).copy()  # writable: the model's own copy
    return array.numpy()
