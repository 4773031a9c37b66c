"""Replace a file in one step: a reader, or a crash, sees the old file or the whole new one.

Every file Confide writes that something else reads back (checkpoints, metrics, reports, the
privacy ledger, keys and certificates, schemas, the coordinator's status) goes through here. The
new content goes to a temporary file of a unique name in the same directory (so the rename stays
on one file system and two writers never share a temporary file), private (0600) from its first
byte, is synced to disk, given its final mode and renamed over the target; then the directory is
synced, so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block succeeds it becomes `path`
    with `mode`, else it is removed. Missing parent directories are created.

    With `exclusive`, an existing `path` is never replaced: FileExistsError instead (a hard link
    fails on an existing name, so a racing writer cannot be overwritten either).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        temporary.chmod(mode)
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path.parent)


def write_atomically(
    path: Path, data: bytes, mode: int = 0o644, *, exclusive: bool = False
) -> None:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path, mode, exclusive=exclusive) as temporary, temporary.open("wb") as out:
        out.write(data)


def write_json_atomically(path: Path, document: Any, mode: int = 0o644) -> None:
    """Indented JSON with a final newline, written atomically."""
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode(), mode)


def _sync_directory(directory: Path) -> None:
    # Makes the rename durable; not every platform can open a directory, and best-effort is enough.
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
