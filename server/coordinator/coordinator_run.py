"""`confide coordinator run`: train on the joined sites and leave the usual run directory.

Talks to the coordinator started by `confide coordinator start` for the same state directory,
over its loopback Control API (`flwr_control.py`): admits any client invited since the
start, waits until the expected sites are online, submits this repository's Flower app with the
run settings, and follows it until Flower reports it finished. The ServerApp writes the run
directory itself (metrics.json, model.safetensors, plots), exactly as under `confide simulate`.
With `resume`, the run directory of an earlier run (e.g. one whose coordinator crashed) is
continued after its last complete round, with the settings it was started with.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.federated_model import initial_federated_state
from common.hf_model import HFModelError, pin_hf_model
from common.pretrained_checkpoint import InitCheckpointError, init_checkpoint_as_sent
from common.run_config import PROJECT_ROOT, RunConfig, RunConfigError
from common.site_keys import CertificateError
from common.tasks import task_schema
from server.coordinator import flwr_control
from server.coordinator.coordinator import (
    CoordinatorError,
    StateLayout,
    ready_status,
    sync_invitations,
)
from server.coordinator.flwr_control import ControlConnection, ControlError
from server.run_record import ResumeError, read_metrics, resumable_metrics

POLL_SECONDS = 2.0
RUN_STATUS_EVERY_SECONDS = 30.0  # metrics.json tells us sooner; this catches a crashed ServerApp


@dataclass(frozen=True)
class RunRequest:
    state: Path
    out: Path
    rounds: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    clients: int | None = None  # how many must be online; default: every registered client
    wait_timeout: float = 600.0
    run_timeout: float = 6 * 3600.0
    resume: bool = False  # continue `out` after its last complete round
    schema: Path | None = None  # a custom task: the federation's own schema file


@dataclass(frozen=True)
class SubmittedRun:
    run_id: int
    run_dir: Path
    config: RunConfig
    connection: ControlConnection
    expected_clients: int


def connect(state: Path) -> tuple[ControlConnection, dict[str, Any]]:
    """The Control API of the coordinator running for `state`, or a one-line error."""
    layout = StateLayout(state.resolve())
    status = ready_status(layout.root)
    connection = ControlConnection(
        layout.flwr_home,
        status["control_address"],
        layout.internal_tls.ca_cert,
        layout.operator_credential,
    )
    return connection, status


def run_config_for(request: RunRequest, expected_clients: int) -> RunConfig:
    overrides = dict(request.overrides)
    if request.resume:  # the settings the run started with, then today's overrides
        try:
            recorded = resumable_metrics(request.out.resolve())["config"]
        except ResumeError as error:
            raise CoordinatorError(f"--resume {request.out}: {error}") from None
        overrides = {**recorded, **overrides, "resume": True}
    if request.schema is not None:
        schema = request.schema.expanduser().resolve()
        if not schema.is_file():
            raise CoordinatorError(f"--schema {request.schema}: no such file; pass the schema "
                                   "every site checks its records against")  # fmt: skip
        # Each site trains on its own file (`confide join --data`); the run only names the task.
        overrides.update(task="custom", **{"schema-file": str(schema)})
        overrides.setdefault("data-file", "each-site-s-own-records")
    if request.rounds is not None:
        overrides["num-server-rounds"] = request.rounds
    overrides.setdefault("num-clients", expected_clients)
    overrides["run-dir"] = str(request.out.resolve())
    try:
        config = init_checkpoint_as_sent(RunConfig.from_mapping(overrides, source="--set"))
        config = pin_hf_model(config)  # every site must hold the coordinator's copy
        if config.init_checkpoint or config.lora_rank:  # checked once, as the ServerApp builds it
            initial_federated_state(task_schema(config), config)
        return config
    except (RunConfigError, InitCheckpointError, HFModelError) as error:
        raise CoordinatorError(str(error)) from None


def wait_for_clients(
    connection: ControlConnection,
    expected: int,
    timeout: float,
    on_wait: Callable[[int, int], None] | None = None,
) -> int:
    """Block until `expected` registered SuperNodes are online; returns how many are."""
    deadline = time.monotonic() + timeout
    while True:
        online = sum(node.get("status") == "online" for node in flwr_control.list_nodes(connection))
        if online >= expected:
            return online
        if on_wait:
            on_wait(online, expected)
        if time.monotonic() > deadline:
            raise CoordinatorError(
                f"only {online} of {expected} clients online after {timeout:.0f}s; start the "
                "missing ones with `confide join`, or pass --clients N to train with fewer"
            )
        time.sleep(POLL_SECONDS)


def submit_run(
    request: RunRequest, on_wait: Callable[[int, int], None] | None = None
) -> SubmittedRun:
    """Validate the settings, wait for the clients, then start the run; returns its handle."""
    connection, status = connect(request.state)
    registered: dict[str, Any] = {}
    if status.get("certs"):
        try:
            registered = sync_invitations(
                connection, StateLayout(request.state.resolve()), Path(status["certs"])
            )
        except (CertificateError, ControlError) as error:
            raise CoordinatorError(str(error)) from None
    elif request.clients is None:
        raise CoordinatorError(
            "--clients N is required with an --insecure coordinator (it has no invited keys to "
            "count)"
        )
    expected = request.clients if request.clients is not None else len(registered)
    if expected < 1:
        raise CoordinatorError(f"--clients {expected}: use a number >= 1")
    config = run_config_for(request, expected)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not request.resume:
        (run_dir / "metrics.json").unlink(missing_ok=True)
    try:
        wait_for_clients(connection, expected, request.wait_timeout, on_wait)
        overrides = {k: v for k, v in config.to_mapping().items() if k in _changed(config)}
        run_id = flwr_control.start_run(connection, PROJECT_ROOT, overrides)
    except ControlError as error:
        raise CoordinatorError(str(error)) from None
    return SubmittedRun(run_id, run_dir, config, connection, expected)


def _changed(config: RunConfig) -> set[str]:
    """Only what differs from the app's defaults travels as an override (a short, clear record)."""
    defaults = RunConfig.from_mapping({}).to_mapping()
    return {key for key, value in config.to_mapping().items() if defaults.get(key) != value}


def wait_for_run(submitted: SubmittedRun, timeout: float) -> dict[str, Any]:
    """Follow the run until Flower reports it finished; returns metrics.json or raises."""
    deadline = time.monotonic() + timeout
    last_check = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - last_check >= RUN_STATUS_EVERY_SECONDS or _metrics_final(submitted.run_dir):
                last_check = now
                run = flwr_control.get_run(submitted.connection, submitted.run_id)
                if str(run.get("status", "")).startswith("finished"):
                    return _finished(submitted, run)
            if now > deadline:
                with contextlib.suppress(ControlError):
                    flwr_control.stop_run(submitted.connection, submitted.run_id)
                raise CoordinatorError(
                    f"run {submitted.run_id} did not finish within {timeout:.0f}s and was "
                    f"stopped; see {submitted.run_dir / 'metrics.json'}"
                )
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        with contextlib.suppress(ControlError):
            flwr_control.stop_run(submitted.connection, submitted.run_id)
        raise
    except ControlError as error:
        raise CoordinatorError(str(error)) from None


def _metrics_final(run_dir: Path) -> bool:
    metrics = read_metrics(run_dir)
    return bool(metrics) and metrics.get("status") in ("completed", "failed")


def _finished(submitted: SubmittedRun, run: Mapping[str, Any]) -> dict[str, Any]:
    metrics = read_metrics(submitted.run_dir)
    status = str(run.get("status"))
    if status == "finished:completed" and metrics and metrics.get("status") == "completed":
        return metrics
    reason = (metrics or {}).get("error") or run.get("status-details") or status
    raise CoordinatorError(
        f"run {submitted.run_id} {status.removeprefix('finished:')}: {reason}; see "
        f"{submitted.run_dir / 'metrics.json'} and the coordinator's logs"
    )


def network_bytes(submitted: SubmittedRun) -> dict[str, int]:
    """Flower's own byte counters for the run (message payloads, not TLS framing)."""
    traffic = flwr_control.get_run(submitted.connection, submitted.run_id).get(
        "network-traffic", {}
    )
    return {key: int(value) for key, value in traffic.items()}
