"""Everything a run leaves on disk, written after each round so a crash loses at most the round in
flight: `metrics.json`, `metrics.csv`, `clients.csv`, `checkpoints/round-NNN.safetensors`,
`model.safetensors`; and at the end `report.md` with its plots."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from common.atomic_file import atomic_output, write_atomically, write_json_atomically
from common.checkpoint import load_weights, save_weights
from common.run_config import RunConfig
from server.federation import RoundRecord
from server.run_report import write_run_report

CSV_COLUMNS = ("round", "accuracy", "loss", "central_accuracy", "clients", "failed", "seconds")
CLIENT_COLUMNS = (
    "round",
    "id",
    "name",
    "num_examples",
    "accuracy",
    "loss",
    "train_examples",
    "train_seconds",
    "epsilon",
    "delta",
)


class ResumeError(RuntimeError):
    """A run directory that cannot be continued; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    last_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, np.ndarray]


class RunRecorder:
    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.started = time.time()
        self.document: dict[str, Any] = {
            "task": config.task,
            "status": "running",
            "config": config.to_mapping(),
            "initial": None,
            "rounds": [],
        }

    def resume(self) -> ResumePoint:
        """Continue after the last complete round: its checkpoint, strategy state and metrics.

        A round counts as complete once its checkpoint and metrics are both on disk; metrics are
        written last, so whatever they list has a checkpoint.
        """
        previous = resumable_metrics(self.run_dir)
        last = previous["rounds"][-1]["round"]
        checkpoint = self.run_dir / "checkpoints" / f"round-{last:03d}.safetensors"
        if not checkpoint.is_file():
            raise ResumeError(f"{checkpoint}: missing; the run directory is incomplete")
        self.document = {**previous, "status": "running", "config": self.config.to_mapping()}
        self.document.setdefault("resumed_after_rounds", []).append(last)
        state_file = self.run_dir / "checkpoints" / f"strategy-{last:03d}.safetensors"
        state = load_numpy(state_file) if state_file.is_file() else {}
        return ResumePoint(last, ArrayRecord(load_weights(checkpoint)), state)

    def initial(self, record: RoundRecord) -> None:
        """Round 0's evaluation, and who declined it (a site's policy, its budget)."""
        self.document["initial"] = {"accuracy": record.accuracy, "loss": record.loss}
        if record.failures:
            document = record.as_json()
            self.document["initial"] |= {
                key: document[key] for key in ("failed", "refused", "failures")
            }
        self._write_metrics()

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, strategy_state: dict[str, np.ndarray]
    ) -> None:
        state = arrays.to_torch_state_dict()
        metadata = {"task": self.config.task, "round": str(record.round)}
        if strategy_state:
            with atomic_output(
                self.run_dir / "checkpoints" / f"strategy-{record.round:03d}.safetensors"
            ) as temporary:
                save_numpy(strategy_state, str(temporary))
        save_weights(
            state, self.run_dir / "checkpoints" / f"round-{record.round:03d}.safetensors", metadata
        )
        save_weights(state, self.run_dir / "model.safetensors", metadata)
        self.document["rounds"].append(_finite(record.as_json()))
        self._write_metrics()

    def finish(self, error: str | None = None) -> None:
        self.document["status"] = "failed" if error else "completed"
        if error:
            self.document["error"] = error
        self._write_metrics()
        if self.document["rounds"]:
            write_run_report(self.document, self.run_dir)

    def _write_metrics(self) -> None:
        self.document["elapsed_seconds"] = time.time() - self.started
        write_json_atomically(self.run_dir / "metrics.json", self.document)
        write_atomically(
            self.run_dir / "metrics.csv", _rounds_csv(self.document["rounds"]).encode()
        )
        write_atomically(
            self.run_dir / "clients.csv", _clients_csv(self.document["rounds"]).encode()
        )


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's metrics.json as it stands, or None before the first write: progress
    displays and the coordinator poll it while the ServerApp runs."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def resumable_metrics(run_dir: Path) -> dict[str, Any]:
    """A run directory's metrics.json, if it lists at least one complete round to continue."""
    path = run_dir / "metrics.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResumeError(f"{path}: cannot resume ({error}); is this a run directory?") from None
    if not isinstance(previous, dict) or not previous.get("rounds"):
        raise ResumeError(f"{path}: no complete round to resume from; start the run afresh")
    return previous


def _finite(document: Any) -> Any:
    """JSON has no NaN: a metric nobody reported is null."""
    if isinstance(document, float) and not math.isfinite(document):
        return None
    if isinstance(document, dict):
        return {key: _finite(value) for key, value in document.items()}
    if isinstance(document, list):
        return [_finite(value) for value in document]
    return document


def _rounds_csv(rounds: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for entry in rounds:
        central = entry.get("central", {}).get("accuracy", "")
        writer.writerow(
            [
                entry["round"],
                entry["accuracy"],
                entry["loss"],
                central,
                len(entry["clients"]),
                entry["failed"],
                round(entry["seconds"], 3),
            ]
        )
    return buffer.getvalue()


def _clients_csv(rounds: list[dict[str, Any]]) -> str:
    """One row per client and round (pandas: `read_csv("clients.csv")`); blank where a client did
    not report a value (not trained this round, or no DP)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CLIENT_COLUMNS, restval="", extrasaction="ignore")
    writer.writeheader()
    for entry in rounds:
        for client in entry["clients"]:
            writer.writerow({**client, "round": entry["round"]})
    return buffer.getvalue()
