"""Plots a person reads after a run: how the global model improved, round by round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a coordinator or in CI
import matplotlib.pyplot as plt

from common.atomic_file import atomic_output


def plot_rounds(metrics: dict[str, Any], path: Path) -> None:
    rounds = metrics["rounds"]
    initial = metrics.get("initial") or {}
    xs = ([0] if initial else []) + [entry["round"] for entry in rounds]

    def series(key: str) -> list[float | None]:
        return ([initial.get(key)] if initial else []) + [entry[key] for entry in rounds]

    accuracies = [entry["accuracy"] for entry in rounds]
    sample_level = [entry.get("epsilon_max") for entry in rounds]
    client_level = [entry.get("client_level_privacy", {}).get("epsilon") for entry in rounds]
    accounted = {
        "sample-level (largest client, DP-SGD)": sample_level,
        "client-level (coordinator)": client_level,
    }
    accounted = {k: v for k, v in accounted.items() if all(e is not None for e in v)}
    private = bool(accounted)
    figure, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10, 4))
    accuracy_axis, loss_axis = axes[0], axes[1]
    accuracy_axis.plot(xs, series("accuracy"), marker="o", label="federated (clients' test sets)")
    central = [entry.get("central", {}).get("accuracy") for entry in rounds]
    if any(value is not None for value in central):
        accuracy_axis.plot(xs[-len(rounds) :], central, marker="s", label="central test set")
    accuracy_axis.set(xlabel="round", ylabel="accuracy", title=f"{metrics['task']}: accuracy")
    accuracy_axis.legend()
    loss_axis.plot(xs, series("loss"), marker="o", color="tab:red")
    loss_axis.set(xlabel="round", ylabel="cross-entropy", title="loss")
    if private:  # what each step of accuracy cost in privacy, at each level accounted
        for label, epsilons in accounted.items():
            axes[2].plot(epsilons, accuracies, marker="o", label=label)
        axes[2].set(xlabel="epsilon spent", ylabel="accuracy", title="accuracy vs privacy")
        axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
