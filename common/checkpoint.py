"""Model weights on disk: safetensors (never pickle), written atomically.

A checkpoint is either the old file or the new one, never half of each: a crash mid-write must not
cost the round that was already complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced to disk and renamed over
    `path` (so a power cut leaves the old file or the new one), else removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_output(path) as temporary, temporary.open("wb") as stream:
        stream.write(data)


def write_json_atomically(path: Path, document: Any) -> None:
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Save a state dict as safetensors; `metadata` records what produced it (task, round...)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
