"""Specifications for common.checkpoint: atomic writes and safetensors weights with metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.checkpoint import (
    atomic_output,
    load_weights,
    save_weights,
    write_atomically,
    write_json_atomically,
)


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(entry.name for entry in directory.iterdir())


def small_state_dict() -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "encoder.bias": torch.tensor([0.5, -0.5, 1.5]),
        "head.steps": torch.tensor([7], dtype=torch.int64),
    }


# -------------------------------------------------------------------------- atomic writes


def test_write_atomically_writes_the_bytes_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    write_atomically(target, b"payload")
    assert target.read_bytes() == b"payload"
    assert files_in(tmp_path) == ["ledger.json"]


def test_write_atomically_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_bytes(b"old contents that are longer than the new ones")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert files_in(tmp_path) == ["ledger.json"]


def test_write_atomically_creates_missing_parent_directories(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "latest" / "state.bin"
    write_atomically(target, b"x")
    assert target.read_bytes() == b"x"


def test_failed_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_bytes(b"round 3")
    with pytest.raises(TypeError):
        write_atomically(target, "text is not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"round 3"
    assert files_in(tmp_path) == ["ledger.json"]


def test_failed_first_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_atomically(tmp_path / "new.json", 12345)  # type: ignore[arg-type]
    assert files_in(tmp_path) == []


def test_atomic_output_yields_a_temporary_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    with atomic_output(target) as temporary:
        assert temporary.parent == tmp_path
        assert temporary != target
        assert temporary.exists()
        assert not target.exists(), "the target appears only once the block succeeds"
        temporary.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert not temporary.exists()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_inside_atomic_output_keeps_the_old_file_and_reraises(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"complete round 4")
    with pytest.raises(type(error)), atomic_output(target) as temporary:
        temporary.write_bytes(b"half of round 5")
        raise error
    assert target.read_bytes() == b"complete round 4"
    assert files_in(tmp_path) == ["model.safetensors"]


def test_json_is_written_readably_with_a_trailing_newline(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    document = {"round": 3, "accuracy": 0.75, "clients": ["a", "b"]}
    write_json_atomically(target, document)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == document
    assert text.endswith("}\n")


def test_unserialisable_json_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_json_atomically(target, {"round": 1})
    with pytest.raises(TypeError):
        write_json_atomically(target, {"round": object()})
    assert json.loads(target.read_text(encoding="utf-8")) == {"round": 1}
    assert files_in(tmp_path) == ["summary.json"]


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
