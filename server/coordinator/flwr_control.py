"""The coordinator's own hand on Flower's Control API: the `flwr` CLI, pointed at loopback.

We drive Flower's supported client (`flwr ... --format json`) instead of its internal Python
classes, so a Flower patch release changes nothing here; it runs as `operator_cli.py`, which
adds the operator credential the SuperLink demands on its Control API
(operator_credential.py). `flwr` reads its connections from
`$FLWR_HOME/config.toml`; the coordinator gives it a home inside its state directory, so the
operator's own `~/.flwr` is never read or written, and the only connection it knows is the
SuperLink on 127.0.0.1 (TLS, trusting the coordinator's loopback CA).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flower_args import FlowerArgumentError, key_values
from common.processes import child_environment
from server.coordinator.operator_credential import TOKEN_FILE_ENV

log = logging.getLogger(__name__)

CONNECTION = "confide"
CALL_TIMEOUT_SECONDS = 180.0  # a busy 2-core coordinator can take a while to answer
ALREADY_REGISTERED = "Public key already in use"


class ControlError(RuntimeError):
    """The Control API refused or failed a call; the message is Flower's own, on one line."""


@dataclass(frozen=True)
class ControlConnection:
    """How the coordinator's `flwr` reaches its SuperLink."""

    flwr_home: Path
    address: str  # 127.0.0.1:PORT
    root_certificates: Path
    credential: Path  # the operator credential file (0600), proof of being the operator

    def write_config(self) -> None:
        """(Re)write `$FLWR_HOME/config.toml` with our single connection as the default."""
        self.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = (
            "# Written by `confide coordinator start`: the coordinator's private Flower CLI home.\n"
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f"root-certificates = {json.dumps(str(self.root_certificates))}\n"
        )
        (self.flwr_home / "config.toml").write_text(text)

    def call(self, *args: str, timeout: float = CALL_TIMEOUT_SECONDS) -> dict[str, Any]:
        """Run `flwr ARGS --format json`; returns the JSON document or raises ControlError."""
        argv = [sys.executable, "-m", "server.coordinator.operator_cli", *args, "--format", "json"]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd=self.flwr_home,
                env=child_environment(
                    {"FLWR_HOME": str(self.flwr_home), TOKEN_FILE_ENV: str(self.credential)}
                ),
            )
        except subprocess.TimeoutExpired:
            raise ControlError(
                f"`flwr {args[0]}` got no answer from the SuperLink at {self.address} within "
                f"{timeout:.0f}s; check the coordinator's log"
            ) from None
        try:
            document = json.loads(result.stdout[result.stdout.index("{") :])
        except ValueError:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ControlError(
                f"`flwr {args[0]}` failed (exit {result.returncode}): "
                f"{detail[-1] if detail else 'no output'}"
            ) from None
        if not document.get("success", False):
            raise ControlError(_one_line(str(document.get("error-message", "unknown error"))))
        return document


def _one_line(message: str) -> str:
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip() and not line.startswith("Using SuperLink")
    ]
    return " ".join(lines) or "unknown error"


def register_node(connection: ControlConnection, public_key: Path, name: str) -> int | None:
    """Admit one client's key; None when the SuperLink already knows it (a restart)."""
    try:
        document = connection.call(
            "supernode", "register", str(public_key), CONNECTION, "--name", name
        )
    except ControlError as error:
        if ALREADY_REGISTERED in str(error):
            return None
        raise
    return int(document["node-id"])


def unregister_node(connection: ControlConnection, node_id: int) -> None:
    """Withdraw a node: its key no longer authenticates (Flower keeps the row, as unregistered)."""
    connection.call("supernode", "unregister", str(node_id), CONNECTION)


def list_nodes(connection: ControlConnection) -> list[dict[str, Any]]:
    return list(connection.call("supernode", "list", CONNECTION)["nodes"])


def start_run(connection: ControlConnection, app_dir: Path, overrides: dict[str, Any]) -> int:
    """Submit the Flower app in `app_dir` with run-config overrides; returns the run ID."""
    try:
        run_config = key_values(overrides)
    except FlowerArgumentError as error:
        raise ControlError(f"--set {error}") from None
    document = connection.call("run", str(app_dir), CONNECTION, "--run-config", run_config)
    return int(document["run-id"])


def get_run(connection: ControlConnection, run_id: int) -> dict[str, Any]:
    runs = connection.call("ls", CONNECTION, "--run-id", str(run_id))["runs"]
    if not runs:
        raise ControlError(f"run {run_id} is unknown to the SuperLink")
    return dict(runs[0])


def stop_run(connection: ControlConnection, run_id: int) -> None:
    connection.call("stop", str(run_id), CONNECTION)
