"""Model weights on disk: safetensors (never pickle), written atomically.

A checkpoint is either the old file or the new one, never half of each: a crash mid-write must not
cost the round that was already complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic_file import atomic_output


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Save a state dict as safetensors; `metadata` records what produced it (task, round...)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
