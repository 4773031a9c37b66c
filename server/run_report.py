"""`report.md` in a run directory: what a person reads after a run, with one PNG per question.

How did the global model improve (accuracy_loss.png)? Did it help every client, or only most of
them (client_accuracy.png)? What did each client spend in privacy (epsilon.png)? Where did the time
go, and how many clients dropped out (round_time.png)? Everything comes from metrics.json, so a
report can be redrawn from any run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a coordinator or in CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.atomic_file import atomic_output, write_atomically
from server.report import plot_rounds


def write_run_report(metrics: dict[str, Any], run_dir: Path) -> None:
    rounds = metrics["rounds"]
    plot_rounds(metrics, run_dir / "accuracy_loss.png")
    figures = [
        ("Accuracy and loss of the global model", "accuracy_loss.png"),
        ("Spread of per-client accuracy", _save(_client_accuracy(rounds), run_dir, "client_accuracy.png")),
        ("Time per round and failed replies (dropouts)", _save(_round_time(rounds), run_dir, "round_time.png")),
    ]  # fmt: skip
    epsilons = latest_epsilons(rounds)
    if epsilons:
        figures.append(
            ("Privacy spent per client (DP-SGD)", _save(_epsilon(epsilons), run_dir, "epsilon.png"))
        )
    markdown = report_markdown(metrics, figures)
    audit_path = run_dir / AUDIT_FILE
    if audit_path.is_file():  # `confide audit` ran on this run directory
        markdown += audit_markdown(json.loads(audit_path.read_text(encoding="utf-8")))
    write_atomically(run_dir / "report.md", markdown.encode())


AUDIT_FILE = "audit.json"
AUDIT_PLOT = "audit_scores.png"


def audit_markdown(audit: dict[str, Any]) -> str:
    """The audit section: the bound beside the claim, and what it means."""
    claim = audit["claimed_epsilon"]
    lines = [
        "",
        "## Privacy audit (one run, Steinke et al. 2023)",
        "",
        f"**{audit['verdict']}**",
        "",
        "| kind | canaries | guesses | correct | confidence | delta | lower bound | claimed epsilon |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| {audit['kind']} | {audit['canaries']} | {audit['guesses']} | {audit['correct']} | "
        f"{audit['confidence']:g} | {audit['delta']:g} | {audit['epsilon_lower_bound']:.3f} | "
        f"{'none' if claim is None else f'{claim:.3f}'} |",
        "",
        "With this confidence, training is *not* (lower bound, delta)-DP; a lower bound above the "
        "claimed epsilon means a bug in DP-SGD or its accounting. A bound below it proves "
        "nothing more than that this audit found no such bug.",
        "",
        f"![canary scores]({AUDIT_PLOT})",
        "",
    ]
    return "\n".join(lines)


def save_audit_plot(
    included: np.ndarray, excluded: np.ndarray, audit: dict[str, Any], run_dir: Path
) -> str:
    """Scores of included and excluded canaries (standardised per site): the further apart,
    the more the trained model reveals about which were in."""
    figure, axis = plt.subplots(figsize=(8, 4))
    bins = np.histogram_bin_edges(np.concatenate([included, excluded]), bins=40)
    axis.hist(excluded, bins=bins, alpha=0.6, label=f"excluded ({len(excluded)})")
    axis.hist(included, bins=bins, alpha=0.6, label=f"included ({len(included)})")
    claim = audit["claimed_epsilon"]
    axis.set(
        xlabel="canary score (standardised per site)",
        ylabel="canaries",
        title=f"{audit['kind']}: epsilon >= {audit['epsilon_lower_bound']:.2f} at "
        f"{audit['confidence']:.0%}" + ("" if claim is None else f" (claimed {claim:.2f})"),
    )
    axis.legend()
    return _save(figure, run_dir, AUDIT_PLOT)


def latest_epsilons(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Each client's cumulative epsilon as last reported (a client reports when it trains); keyed
    by node id, since a client that trained but was not evaluated is known by its node only."""
    latest: dict[str, float] = {}
    for entry in rounds:
        for client in entry["clients"]:
            if client.get("epsilon") is not None:
                latest[str(client["id"])] = client["epsilon"]
        latest.update(entry.get("trained_epsilons", {}))
    return latest


def report_markdown(metrics: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    rounds = metrics["rounds"]
    config = metrics["config"]
    lines = [
        f"# {metrics['task']}: {metrics['status']}",
        "",
        f"{config['num-clients']} clients ({config['partitioner']} split), strategy "
        f"{config['strategy']}, {len(rounds)} of {config['num-server-rounds']} rounds, "
        f"{metrics.get('elapsed_seconds', 0):.0f} s."
        + (f" DP-SGD at target epsilon {config['target-epsilon']:g}." if config["dp"] else ""),
    ]
    if metrics.get("error"):
        lines += ["", f"**Stopped:** {metrics['error']}"]
    lines += [
        "",
        "| round | accuracy | loss | clients evaluated | failed replies | rejected | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in rounds:
        accuracy, loss = entry["accuracy"], entry["loss"]
        lines.append(
            f"| {entry['round']} | {'' if accuracy is None else f'{accuracy:.4f}'} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {len(entry['clients'])} | "
            f"{entry['failed']} | {entry.get('rejected', 0)} | {entry['seconds']:.1f} |"
        )
    failures = [(entry["round"], f) for entry in rounds for f in entry.get("failures", [])]
    if failures:
        lines += ["", f"Failed replies ({len(failures)}; first 10):", ""]
        lines += [
            f"- round {number}, {f.get('stage', '?')}: node {f['id']}: {f['reason']}"
            for number, f in failures[:10]
        ]
    for title, file_name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({file_name})"]
    lines += ["", "Per round: `metrics.csv`; per client and round: `clients.csv`.", ""]
    return "\n".join(lines)


def _client_accuracy(rounds: list[dict[str, Any]]) -> Figure:
    figure, axis = plt.subplots(figsize=(8, 4))
    per_round = [[c["accuracy"] for c in entry["clients"]] for entry in rounds]
    numbers = [entry["round"] for entry in rounds]
    axis.boxplot(per_round, positions=numbers, widths=0.6)
    axis.plot(numbers, [entry["accuracy"] for entry in rounds], marker="o", label="federated")
    axis.set(
        xlabel="round", ylabel="accuracy on the client's test set", title="per-client accuracy"
    )
    axis.legend()
    return figure


def _round_time(rounds: list[dict[str, Any]]) -> Figure:
    figure, axis = plt.subplots(figsize=(8, 4))
    numbers = [entry["round"] for entry in rounds]
    axis.bar(numbers, [entry["seconds"] for entry in rounds], color="tab:gray")
    axis.set(xlabel="round", ylabel="seconds", title="time per round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    failed_axis = axis.twinx()
    failed_axis.plot(numbers, [entry["failed"] for entry in rounds], "rx-", label="failed replies")
    failed_axis.set_ylabel("failed replies (dropouts, errors)")
    failed_axis.set_ylim(bottom=0)
    failed_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    failed_axis.legend(loc="upper right")
    return figure


def _epsilon(epsilons: dict[str, float]) -> Figure:
    figure, axis = plt.subplots(figsize=(8, 4))
    ordered = sorted(epsilons.values())
    axis.plot(range(1, len(ordered) + 1), ordered, drawstyle="steps-post", color="tab:green")
    axis.set(
        xlabel=f"clients, sorted ({len(ordered)} reported)",
        ylabel="epsilon spent (cumulative)",
        title="privacy spent per client",
    )
    return figure


def _save(figure: Figure, run_dir: Path, file_name: str) -> str:
    for axis in figure.axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_output(run_dir / file_name) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return file_name
