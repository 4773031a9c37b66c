"""Optional: a run's metrics as TensorBoard scalars, for people who compare runs there.

TensorBoard is not a dependency of Confide; `confide simulate --tensorboard` checks for it before
the run starts (`tensorboard_missing`) rather than failing after an hour of training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "--tensorboard needs the tensorboard package: .venv/bin/pip install tensorboard"


def tensorboard_missing() -> str | None:
    """Why an export cannot run here, or None when it can."""
    return None if importlib.util.find_spec("tensorboard") else INSTALL_HINT


def export_tensorboard(metrics: dict[str, Any], log_dir: Path) -> None:
    """One scalar per round and metric, plus per-client accuracy as a histogram per round."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for entry in metrics["rounds"]:
            step = entry["round"]
            for key in ("accuracy", "loss", "seconds", "failed", "epsilon_max"):
                if entry.get(key) is not None:
                    writer.add_scalar(f"federated/{key}", entry[key], step)
            accuracies = [client["accuracy"] for client in entry["clients"]]
            if accuracies:
                writer.add_histogram("clients/accuracy", np.asarray(accuracies), step)
    finally:
        writer.close()
