"""Specifications for common.atomic_file: one atomic write for every file Confide reads back."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from common.atomic_file import atomic_output, write_atomically, write_json_atomically


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(entry.name for entry in directory.iterdir())


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


def test_the_file_gets_the_mode_asked_for(tmp_path: Path) -> None:
    secret, public = tmp_path / "ca.key", tmp_path / "ca.crt"
    write_atomically(secret, b"key", 0o600)
    write_atomically(public, b"cert")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_the_content_is_private_until_it_is_in_place(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "schema.toml", 0o644) as temporary:
        assert stat.S_IMODE(temporary.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "schema.toml").stat().st_mode) == 0o644


def test_exclusive_never_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "site.key"
    write_atomically(target, b"first", 0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomically(target, b"second", 0o600, exclusive=True)
    assert target.read_bytes() == b"first"
    assert files_in(tmp_path) == ["site.key"]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "coordinator.json"
    payloads = [json.dumps({"writer": n, "pad": "x" * 100_000}).encode() for n in range(8)]
    start = threading.Barrier(len(payloads))

    def write(payload: bytes) -> None:
        start.wait()
        write_atomically(target, payload)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert files_in(tmp_path) == ["coordinator.json"]


def test_the_directory_is_synced_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(handle: int) -> None:
        synced.append(os.fstat(handle).st_ino)
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json_atomically(target, {"round": 1})
    assert synced[-1] == tmp_path.stat().st_ino
    assert target.stat().st_ino in synced
