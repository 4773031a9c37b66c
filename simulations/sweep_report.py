"""One comparison of a sweep's runs: a table (terminal, sweep.md, sweep.csv) and a plot (sweep.png).

Everything is read back from each run's metrics.json, so a sweep whose runs were resumed or rerun
one by one compares the same way.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in CI
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from common.atomic_file import atomic_output, write_atomically
from server.run_record import read_metrics
from simulations.sweep import SweepRun

COLUMNS = (
    "run",
    "status",
    "rounds",
    "final accuracy",
    "best accuracy",
    "final loss",
    "failed replies",
    "epsilon (max)",
    "seconds",
)


def comparison_rows(runs: list[SweepRun]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        metrics = read_metrics(Path(run.scenario.config.run_dir)) or {"rounds": []}
        rounds = metrics["rounds"]
        accuracies = [entry["accuracy"] for entry in rounds if entry["accuracy"] is not None]
        epsilons = [entry["epsilon_max"] for entry in rounds if entry.get("epsilon_max")]
        rows.append(
            {
                "run": run.label,
                **run.values,
                "status": metrics.get("status", "not started"),
                "rounds": len(rounds),
                "final accuracy": rounds[-1]["accuracy"] if rounds else None,
                "best accuracy": max(accuracies, default=None),
                "final loss": rounds[-1]["loss"] if rounds else None,
                "failed replies": sum(entry["failed"] for entry in rounds),
                "epsilon (max)": max(epsilons, default=None),
                "seconds": metrics.get("elapsed_seconds"),
                "accuracy per round": [entry["accuracy"] for entry in rounds],
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in COLUMNS))
    return table


def write_comparison(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """sweep.csv (one row per run, swept settings as their own columns), sweep.md, sweep.png."""
    swept = [key for key in rows[0] if key not in COLUMNS and key != "accuracy per round"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", *swept, *COLUMNS[1:]])
    for row in rows:
        writer.writerow([row["run"], *(row[k] for k in swept), *(row[c] for c in COLUMNS[1:])])
    write_atomically(out / "sweep.csv", buffer.getvalue().encode())
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c == "run" else "---:" for c in COLUMNS) + "|",
        *("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows),
        "",
        "Each run's own report is `RUN/report.md`.",
        "",
        "![final accuracy and accuracy per round of each run](sweep.png)",
        "",
    ]
    write_atomically(out / "sweep.md", "\n".join(lines).encode())
    plot_comparison(rows, out / "sweep.png", title)


def plot_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    figure, (final_axis, rounds_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [row["run"] for row in rows]
    finals = [row["final accuracy"] or 0.0 for row in rows]
    final_axis.barh(labels, finals, color="tab:blue")
    final_axis.invert_yaxis()  # first run on top, as in the table
    final_axis.set(xlabel="final accuracy", title=f"{title}: final accuracy per run")
    for row in rows:
        per_round = row["accuracy per round"]
        rounds_axis.plot(range(1, len(per_round) + 1), per_round, marker="o", label=row["run"])
    rounds_axis.set(xlabel="round", ylabel="accuracy", title="accuracy per round")
    rounds_axis.legend(fontsize="small")
    rounds_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (final_axis, rounds_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
