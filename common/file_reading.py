"""Reading a file someone named on the command line, with the one-line error they can act on."""

from __future__ import annotations

from pathlib import Path


def read_named_file(path: Path, what: str, hint: str, error: type[Exception]) -> bytes:
    """The file's bytes, or `error` naming the file, what was expected and `hint` (what to do)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found; {hint}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected the {what} file; {hint}") from None
    except OSError as err:
        raise error(f"{path}: {what} unreadable ({err.strerror}); fix its permissions") from None
