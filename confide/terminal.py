"""What every `confide` command prints with: one console each for output and errors, and the
one-line error contract (red `error:` line, exit code 2)."""

from __future__ import annotations

import typer
from rich.console import Console

# emoji=False: a fingerprint's ":CD:" must not turn into a picture of a CD.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def fail(message: str) -> typer.Exit:
    """One line on stderr and a non-zero exit: what went wrong and what to do."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
