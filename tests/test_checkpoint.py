"""Specifications for common.checkpoint: safetensors weights with metadata, written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.checkpoint import load_weights, save_weights


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(entry.name for entry in directory.iterdir())


def small_state_dict() -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "encoder.bias": torch.tensor([0.5, -0.5, 1.5]),
        "head.steps": torch.tensor([7], dtype=torch.int64),
    }


# --------------------------------------------------------------------------------- weights


def test_weights_round_trip_with_names_dtypes_and_values(tmp_path: Path) -> None:
    state = small_state_dict()
    path = tmp_path / "model.safetensors"
    save_weights(state, path, {"task": "heart"})
    loaded = load_weights(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_weights_file_carries_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    metadata = {"task": "bank", "round": "12", "strategy": "fedprox"}
    save_weights(small_state_dict(), path, metadata)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_weights_are_saved_from_non_contiguous_tensors_that_require_grad(tmp_path: Path) -> None:
    weight = torch.randn(4, 3, requires_grad=True)
    transposed = weight.t()
    assert not transposed.is_contiguous()
    path = tmp_path / "model.safetensors"
    save_weights({"transposed": transposed}, path, {})
    assert torch.equal(load_weights(path)["transposed"], weight.detach().t())


def test_saving_weights_leaves_only_the_checkpoint(tmp_path: Path) -> None:
    save_weights(small_state_dict(), tmp_path / "ckpt" / "round-1.safetensors", {})
    assert files_in(tmp_path / "ckpt") == ["round-1.safetensors"]


def test_failed_save_keeps_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(small_state_dict(), path, {"round": "1"})
    shared = torch.zeros(3)
    # safetensors refuses tensors that share memory, after the temporary file exists.
    with pytest.raises(RuntimeError, match="share memory"):
        save_weights({"a": shared, "b": shared}, path, {"round": "2"})
    assert files_in(tmp_path) == ["model.safetensors"]
    assert torch.equal(load_weights(path)["encoder.bias"], small_state_dict()["encoder.bias"])
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"round": "1"}


def test_non_string_metadata_fails_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(small_state_dict(), path, {"round": "1"})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_weights(small_state_dict(), path, {"round": 2})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["model.safetensors"]
