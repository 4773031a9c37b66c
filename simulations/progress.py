"""Live progress of a run, read from the metrics the ServerApp writes after each round.

Watching `metrics.json` instead of hooking into the ServerApp keeps the apps free of display code,
and works the same for a simulation in this process and a coordinator run elsewhere.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from server.run_record import read_metrics


class RoundProgress:
    """A rich progress bar over rounds, refreshed from the run directory in a background thread."""

    def __init__(self, run_dir: Path, num_rounds: int, console: Console) -> None:
        self.run_dir = run_dir
        self.num_rounds = num_rounds
        self.stop = threading.Event()
        self.progress = Progress(
            TextColumn("[bold]round {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("rounds", total=num_rounds, status="starting...")
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self._refresh()
        self.progress.stop()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            self._refresh()

    def _refresh(self) -> None:
        metrics = read_metrics(self.run_dir)
        if not metrics:
            return
        rounds = metrics["rounds"]
        if rounds:
            last = rounds[-1]
            status = (
                f"accuracy {last['accuracy']:.3f}  loss {last['loss']:.3f}  "
                f"clients {len(last['clients'])}  failed {last['failed']}"
            )
        else:
            status = "initial evaluation done" if metrics.get("initial") else "starting..."
        self.progress.update(self.task, completed=len(rounds), status=status)


def summary_table(metrics: dict[str, Any]) -> Table:
    table = Table(title=f"{metrics['task']}: {metrics['status']}")
    for column in ("round", "accuracy", "loss", "clients", "failed", "seconds"):
        table.add_column(column, justify="right")
    if metrics.get("initial"):
        initial = metrics["initial"]
        table.add_row("0", f"{initial['accuracy']:.4f}", f"{initial['loss']:.4f}", "", "", "")
    for entry in metrics["rounds"]:
        table.add_row(
            str(entry["round"]),
            f"{entry['accuracy']:.4f}",
            f"{entry['loss']:.4f}",
            str(len(entry["clients"])),
            str(entry["failed"]),
            f"{entry['seconds']:.1f}",
        )
    return table
