"""`confide coordinator`: run the federation's SuperLink behind a locked front door, and train.

`start` checks every input first (certificates, key, host names, port, nginx), then starts
`flower-superlink` on loopback (TLS, SuperNode authentication, SQLite state, no runtime dependency
installation), registers the invited clients' public keys, and opens the public port with nginx
(`server/control_proxy.py`). It stays in the foreground until Ctrl-C or SIGTERM (what systemd and
ops people expect), then stops everything it started. `stop` asks a running `start` to do so.
`run` submits training to that SuperLink through Flower's CLI on loopback, waits for the invited
clients, follows the run and leaves the same run directory as `confide simulate`.

The state directory holds everything that must survive a restart (the SuperLink database, which
keys are registered) plus logs and the coordinator's private loopback TLS identity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.certificates import (
    CertificateError,
    CertsLayout,
    client_public_keys,
    describe,
    init_certs,
    verify_key_matches_certificate,
    verify_server_certificate,
)
from common.processes import (
    ManagedProcess,
    ProcessError,
    child_environment,
    find_executable,
    free_port,
    is_loopback,
    pid_alive,
    port_in_use,
    stop_all,
    wait_for_port,
)
from server import flwr_control
from server.control_proxy import NGINX_HINT, UPSTREAM_TLS_NAME, ProxySettings, start_proxy
from server.flwr_control import ControlConnection, ControlError

log = logging.getLogger(__name__)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9092
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 60.0
INTERNAL_TLS_DAYS = 3650
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
FLOWER_HINT = "reinstall Confide in this environment: pip install -e ."


class CoordinatorError(RuntimeError):
    """Why the coordinator cannot start, run or stop, on one line naming the file and the fix."""


# ------------------------------------------------------------------------------ state directory


@dataclass(frozen=True)
class StateLayout:
    """Where the coordinator keeps what must survive a restart, and its logs."""

    root: Path

    @property
    def status_file(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def registered(self) -> Path:
        return self.root / "registered.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def internal_tls(self) -> CertsLayout:
        return CertsLayout(self.root / "loopback-tls")

    @property
    def proxy(self) -> Path:
        return self.root / "proxy"


def read_status(state: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(StateLayout(state).status_file.read_text()))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def running_status(state: Path) -> dict[str, Any] | None:
    """coordinator.json of a live `coordinator start` for `state`, else None."""
    status = read_status(state)
    if status and status.get("status") in ("starting", "ready") and pid_alive(int(status["pid"])):
        return status
    return None


# ------------------------------------------------------------------------------ start: checks


@dataclass(frozen=True)
class StartSettings:
    certs: Path | None  # None only with insecure
    state: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    insecure: bool = False


def check_start(settings: StartSettings) -> dict[str, Path]:
    """Every check that needs no process; returns the invited clients' public keys."""
    host = settings.host
    if not 1 <= settings.port <= 65535:
        raise CoordinatorError(f"--port {settings.port}: use a port number in 1-65535")
    if settings.insecure and not is_loopback(host):
        raise CoordinatorError(
            f"--insecure with --host {host}: plaintext is refused on a non-loopback address; "
            "drop --insecure (clients then need ca.crt), or use --host 127.0.0.1 for a local "
            "experiment"
        )
    if settings.state.exists() and not settings.state.is_dir():
        raise CoordinatorError(f"{settings.state}: exists and is not a directory; pass --state DIR")
    running = running_status(settings.state)
    if running:
        raise CoordinatorError(
            f"{StateLayout(settings.state).status_file}: a coordinator already runs for this "
            f"state (pid {running['pid']}); stop it with `confide coordinator stop --state "
            f"{settings.state}`"
        )
    keys: dict[str, Path] = {}
    if not settings.insecure:
        keys = _check_certs(settings)
    try:
        if port_in_use(host or DEFAULT_HOST, settings.port):
            raise CoordinatorError(
                f"{host}:{settings.port} is already in use (another coordinator or service?); "
                "stop it or pass another --port"
            )
    except OSError as error:
        raise CoordinatorError(
            f"--host {host}: cannot listen there ({error.strerror}); use an address of this "
            f"machine, or {DEFAULT_HOST} for all of them"
        ) from None
    try:
        find_executable("nginx", NGINX_HINT)
        find_executable("flower-superlink", FLOWER_HINT)
        find_executable("flwr", FLOWER_HINT)
    except ProcessError as error:
        raise CoordinatorError(str(error)) from None
    return keys


def _check_certs(settings: StartSettings) -> dict[str, Path]:
    if settings.certs is None:
        raise CoordinatorError("--certs is required: the directory made by `confide certs init`")
    layout = CertsLayout(settings.certs)
    try:
        keys = client_public_keys(layout.root)
        verify_key_matches_certificate(layout.server_cert, layout.server_key)
        dialled = settings.host if settings.host not in WILDCARD_HOSTS else _first_san(layout)
        verify_server_certificate(layout.ca_cert, layout.server_cert, dialled)
    except CertificateError as error:
        raise CoordinatorError(str(error)) from None
    if not keys:
        raise CoordinatorError(
            f"{layout.manifest}: no client is invited; `confide certs add-client "
            f"{layout.root} NAME` first"
        )
    return keys


def _first_san(layout: CertsLayout) -> str:
    certs, _ = describe(layout.root)
    server = next(info for info in certs if info.path == layout.server_cert)
    if not server.sans:
        raise CertificateError(f"{layout.server_cert}: has no SANs; reissue it with --host")
    return server.sans[0]


# ------------------------------------------------------------------------------ start: processes


def _loopback_identity(state: StateLayout) -> CertsLayout:
    """The SuperLink's own TLS identity for loopback; made once, renewed when it fails checks."""
    tls = state.internal_tls
    try:
        verify_key_matches_certificate(tls.server_cert, tls.server_key)
        verify_server_certificate(tls.ca_cert, tls.server_cert, UPSTREAM_TLS_NAME)
        return tls
    except CertificateError:
        shutil.rmtree(tls.root, ignore_errors=True)
    return init_certs(tls.root, ["127.0.0.1", "localhost"], [], valid_days=INTERNAL_TLS_DAYS)


def _superlink_argv(tls: CertsLayout, database: Path, port: int, auth: bool) -> list[str]:
    """Loopback only, TLS even there; SuperNode authentication unless a plaintext experiment
    (Flower cannot authenticate SuperNodes without TLS on their side). `flower-superlink` itself,
    run through `server.superlink_launcher` for a longer SQLite lock wait."""
    argv = [
        sys.executable, "-m", "server.superlink_launcher",
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    return [*argv, "--enable-supernode-auth"] if auth else argv


@dataclass
class Coordinator:
    """A started coordinator: its processes, and how `flwr` reaches its Control API."""

    settings: StartSettings
    connection: ControlConnection
    processes: list[ManagedProcess] = field(default_factory=list)
    registered: dict[str, Any] = field(default_factory=dict)

    @property
    def public_address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"

    def dead_process(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.alive()), None)

    def stop(self) -> None:
        stop_all(self.processes)
        self.processes.clear()
        status = read_status(self.settings.state) or {}
        if status.get("pid") == os.getpid():
            _write_json(
                StateLayout(self.settings.state).status_file, {**status, "status": "stopped"}
            )


def start_coordinator(settings: StartSettings) -> Coordinator:
    """Check, then start SuperLink + registrations + front door; on any failure stop them all."""
    settings = StartSettings(
        settings.certs.resolve() if settings.certs else None, settings.state.resolve(),
        settings.host, settings.port, settings.insecure,
    )  # fmt: skip
    keys = check_start(settings)
    state = StateLayout(settings.state)
    state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.logs.mkdir(exist_ok=True)
    tls = _loopback_identity(state)
    internal_port = free_port()
    connection = ControlConnection(state.flwr_home, f"127.0.0.1:{internal_port}", tls.ca_cert)
    connection.write_config()
    coordinator = Coordinator(settings, connection)
    status = {
        "pid": os.getpid(),
        "status": "starting",
        "public_address": coordinator.public_address,
        "control_address": connection.address,
        "insecure": settings.insecure,
        "certs": str(settings.certs) if settings.certs else None,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_json(state.status_file, status)
    try:
        fresh_database = not state.database.exists()
        superlink = ManagedProcess(
            "flower-superlink",
            _superlink_argv(tls, state.database, internal_port, auth=not settings.insecure),
            state.logs / "superlink.log",
            env=_flower_env(state),
        )
        coordinator.processes.append(superlink)
        wait_for_port("127.0.0.1", internal_port, superlink, START_TIMEOUT_SECONDS)
        if fresh_database:
            state.registered.unlink(missing_ok=True)
        coordinator.registered = register_clients(connection, keys, state.registered)
        layout = CertsLayout(settings.certs) if settings.certs else None
        proxy_settings = ProxySettings(
            listen_host=settings.host,
            listen_port=settings.port,
            server_cert=layout.server_cert if layout else None,
            server_key=layout.server_key if layout else None,
            upstream_port=internal_port,
            upstream_ca=tls.ca_cert,
            workdir=state.proxy,
        )
        proxy = start_proxy(proxy_settings, state.logs / "nginx.log")
        coordinator.processes.append(proxy)
        dial = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host.strip("[]")
        wait_for_port(dial, settings.port, proxy, START_TIMEOUT_SECONDS)
    except (ProcessError, ControlError, CertificateError) as error:
        coordinator.stop()
        raise CoordinatorError(str(error)) from None
    except BaseException:
        coordinator.stop()
        raise
    status.update(
        status="ready",
        processes={p.name: p.pid for p in coordinator.processes},
        clients=sorted(coordinator.registered),
    )
    _write_json(state.status_file, status)
    return coordinator


def _flower_env(state: StateLayout) -> dict[str, str]:
    # FLWR_HOME: where the SuperLink's SuperExec unpacks the app; never the operator's ~/.flwr.
    return child_environment({"FLWR_HOME": str(state.flwr_home)})


def register_clients(
    connection: ControlConnection, keys: Mapping[str, Path], record_path: Path
) -> dict[str, Any]:
    """Admit every invited key the SuperLink does not know yet; remembers them across restarts."""
    try:
        record: dict[str, Any] = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    for name, public_key in keys.items():
        parts = public_key.read_text(errors="replace").split()
        if len(parts) < 2:
            raise CoordinatorError(
                f"{public_key}: not an OpenSSH public key line; restore it or re-invite {name}"
            )
        fingerprint = parts[1]
        if record.get(name, {}).get("public_key") == fingerprint:
            continue
        node_id = flwr_control.register_node(connection, public_key, name)
        log.info("registered client %s (node %s)", name, node_id)
        record[name] = {"public_key": fingerprint, "node_id": node_id}
        _write_json(record_path, record)
    return record


def serve(coordinator: Coordinator, should_stop: threading.Event) -> None:
    """Block until asked to stop or a process dies; always stops everything it started."""
    try:
        while not should_stop.wait(1.0):
            dead = coordinator.dead_process()
            if dead is not None:
                raise CoordinatorError(
                    f"{dead.name} exited unexpectedly (code {dead.popen.returncode}); see "
                    f"{dead.log_path}; the coordinator stopped everything it started"
                )
    finally:
        coordinator.stop()


def abort_on_sigterm() -> None:
    """While starting, SIGTERM aborts like Ctrl-C, so the cleanup in `start_coordinator` runs."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------ stop


def stop_coordinator(state: Path, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
    """SIGTERM the running `coordinator start` for `state`; returns its pid (None: none ran)."""
    status = running_status(state.resolve())
    if status is None:
        return None
    pid = int(status["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        for child in status.get("processes", {}).values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(child), signal.SIGKILL)
        raise CoordinatorError(
            f"coordinator pid {pid} did not stop within {timeout:.0f}s and was killed; see "
            f"{StateLayout(state).logs}"
        )
    return pid
