"""`confide coordinator`: run the federation's SuperLink behind a locked front door, and train.

`start` checks every input first (certificates, key, host names, port, nginx), then starts
`flower-superlink` on loopback (TLS, SuperNode authentication, SQLite state, no runtime dependency
installation), registers the invited clients' public keys, and opens the public port with nginx
(`control_proxy.py`). It stays in the foreground until Ctrl-C or SIGTERM (what systemd and
ops people expect), then stops everything it started. `stop` asks a running `start` to do so.
`run` submits training to that SuperLink through Flower's CLI on loopback, waits for the invited
clients, follows the run and leaves the same run directory as `confide simulate`.

Membership follows the certificates directory's clients.json, not the other way round: at start,
whenever clients.json changes while it runs, and before each run, every invited key the SuperLink
does not know is registered and every node whose key is no longer invited (revoked, removed) is
unregistered, so a site joins without a restart and a revocation takes effect within seconds.

The state directory holds everything that must survive a restart (the SuperLink database, which
keys are registered) plus logs, the operator credential (operator_credential.py) and the
coordinator's private loopback TLS identity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically, write_json_atomically
from common.certificates.checking import (
    describe,
    verify_key_matches_certificate,
    verify_server_certificate,
)
from common.certificates.issuing import init_certs
from common.certificates.layout import CertsLayout
from common.certificates.manifest import client_public_keys, revoked_clients
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
from common.site_keys import (
    SITE_STATUS_PREFIX,
    CertificateError,
    flower_public_key_bytes,
    load_public_key,
    status_name,
)
from server.coordinator import flwr_control
from server.coordinator.control_proxy import (
    DEFAULT_MAX_REQUEST_MB,
    NGINX_HINT,
    UPSTREAM_TLS_NAME,
    ProxySettings,
    start_proxy,
)
from server.coordinator.flwr_control import ControlConnection, ControlError
from server.coordinator.operator_credential import TOKEN_FILE_ENV, create_credential

log = logging.getLogger(__name__)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9092
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 60.0
INTERNAL_TLS_DAYS = 3650
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
FLOWER_HINT = "reinstall Confide in this environment: pip install -e ."
SYNC_EVERY_SECONDS = 2.0  # how soon an invitation or revocation in clients.json takes effect
SITE_STATUS_INVITED = "invited"
SITE_STATUS_REVOKED = "revoked"


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

    @property
    def operator_credential(self) -> Path:
        return self.root / "operator.credential"

    @property
    def site_status(self) -> Path:
        """The nginx map of invited and revoked keys, so a refused site can learn why
        (control_proxy.SITE_STATUS_PREFIX)."""
        return self.proxy / "site-status.map"


def read_status(state: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(StateLayout(state).status_file.read_text()))
    except (OSError, ValueError):
        return None


def running_status(state: Path) -> dict[str, Any] | None:
    """coordinator.json of a live `coordinator start` for `state`, else None."""
    status = read_status(state)
    if status and status.get("status") in ("starting", "ready") and pid_alive(int(status["pid"])):
        return status
    return None


def ready_status(state: Path) -> dict[str, Any]:
    """coordinator.json of the ready coordinator for `state`, or a one-line error saying why."""
    layout = StateLayout(state)
    status = running_status(layout.root)
    if status is not None and status.get("status") == "starting":
        raise CoordinatorError(
            f"{layout.status_file}: the coordinator for {layout.root} is still starting; "
            "run this again once `confide coordinator status` says ready"
        )
    if status is None or status.get("status") != "ready":
        raise CoordinatorError(
            f"{layout.status_file}: no coordinator is running for {layout.root}; start it with "
            f"`confide coordinator start --certs DIR --state {layout.root}`"
        )
    return status


def online_sites(state: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The running coordinator's status and every node it knows (not unregistered ones), read
    from the SuperLink's database: no `flwr` process and no torch import, so it answers at once."""
    status = ready_status(state.resolve())
    nodes = known_nodes(StateLayout(state.resolve()).database)
    return status, [
        {"name": node.name, "node": str(node.node_id),
         "status": "online" if node.online else ("offline" if node.status == "online"
                                                 else node.status)}
        for node in nodes
        if node.status != "unregistered"
    ]  # fmt: skip


# ------------------------------------------------------------------------------ start: checks


@dataclass(frozen=True)
class StartSettings:
    certs: Path | None  # None only with insecure
    state: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    insecure: bool = False
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB


def ca_key_warning(certs: Path | None) -> str | None:
    """A loud line when the CA key sits beside the coordinator's files: whoever takes this
    machine could then mint a coordinator certificate every site trusts."""
    if certs is None:
        return None
    ca_key = CertsLayout(certs).ca_key
    if not ca_key.exists():
        return None
    return (
        f"{ca_key.resolve()}: the CA's private key is on the coordinator machine; anyone who "
        "reads it can impersonate this coordinator to every site. Move it offline (this "
        "machine needs only ca.crt, server.crt, server.key, clients.json and clients/*.pub), "
        "or make new federations with `confide certs init --ca-key-out PATH`"
    )


def check_start(settings: StartSettings) -> dict[str, Path]:
    """Every check that needs no process; returns the invited clients' public keys."""
    host = settings.host
    if not 1 <= settings.port <= 65535:
        raise CoordinatorError(f"--port {settings.port}: use a port number in 1-65535")
    if not 1 <= settings.max_request_mb <= 4096:
        raise CoordinatorError(
            f"--max-request-mb {settings.max_request_mb}: use 1-4096 (default "
            f"{DEFAULT_MAX_REQUEST_MB}; Flower sends arrays in chunks of 5 MB)"
        )
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
    run through `server.coordinator.superlink_launcher` for a longer SQLite lock wait."""
    argv = [
        sys.executable, "-m", "server.coordinator.superlink_launcher",
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

    def reload_proxy(self) -> None:
        """nginx re-reads its configuration (the site-status map) without dropping connections."""
        proxy = next((p for p in self.processes if p.name.startswith("nginx")), None)
        if proxy is not None and proxy.alive():
            os.kill(proxy.pid, signal.SIGHUP)

    def stop(self) -> None:
        stop_all(self.processes)
        self.processes.clear()
        status = read_status(self.settings.state) or {}
        if status.get("pid") == os.getpid():
            write_json_atomically(
                StateLayout(self.settings.state).status_file, {**status, "status": "stopped"}
            )


def start_coordinator(settings: StartSettings) -> Coordinator:
    """Check, then start SuperLink + registrations + front door; on any failure stop them all."""
    settings = StartSettings(
        settings.certs.resolve() if settings.certs else None, settings.state.resolve(),
        settings.host, settings.port, settings.insecure, settings.max_request_mb,
    )  # fmt: skip
    check_start(settings)
    state = StateLayout(settings.state)
    state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.root.chmod(0o700)  # the operator credential lives here
    state.logs.mkdir(exist_ok=True)
    tls = _loopback_identity(state)
    internal_port = free_port()
    create_credential(state.operator_credential)
    connection = ControlConnection(
        state.flwr_home, f"127.0.0.1:{internal_port}", tls.ca_cert, state.operator_credential
    )
    connection.write_config()
    coordinator = Coordinator(settings, connection)
    status = {
        "pid": os.getpid(),
        "start_ticks": process_start_ticks(os.getpid()),
        "status": "starting",
        "public_address": coordinator.public_address,
        "control_address": connection.address,
        "insecure": settings.insecure,
        "certs": str(settings.certs) if settings.certs else None,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomically(state.status_file, status)
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
        if settings.certs is not None:
            coordinator.registered = sync_invitations(connection, state, settings.certs)
        layout = CertsLayout(settings.certs) if settings.certs else None
        proxy_settings = ProxySettings(
            listen_host=settings.host,
            listen_port=settings.port,
            server_cert=layout.server_cert if layout else None,
            server_key=layout.server_key if layout else None,
            upstream_port=internal_port,
            upstream_ca=tls.ca_cert,
            workdir=state.proxy,
            max_request_mb=settings.max_request_mb,
            site_status=state.site_status if settings.certs else None,
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
        process_start_ticks={p.name: process_start_ticks(p.pid) for p in coordinator.processes},
        clients=sorted(coordinator.registered),
    )
    write_json_atomically(state.status_file, status)
    return coordinator


def _flower_env(state: StateLayout) -> dict[str, str]:
    # FLWR_HOME: where the SuperLink's SuperExec unpacks the app; never the operator's ~/.flwr.
    return child_environment(
        {"FLWR_HOME": str(state.flwr_home), TOKEN_FILE_ENV: str(state.operator_credential)}
    )


@dataclass(frozen=True)
class KnownNode:
    """A node as the SuperLink's own database holds it."""

    node_id: int
    name: str
    status: str  # registered | online | offline | unregistered
    online: bool
    public_key: bytes  # PEM SubjectPublicKeyInfo, as Flower stores it


def known_nodes(database: Path) -> list[KnownNode]:
    """Every node in the SuperLink's database, read-only (no Control API call, so instant).

    Flower marks a node offline lazily, so "online" also requires its deadline not to be past.
    """
    if not database.exists():
        return []
    uri = f"{database.resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        rows = db.execute(
            "SELECT node_id, name, status, online_until, public_key FROM node"
        ).fetchall()
    now = time.time()
    return [
        KnownNode(
            node_id=int(node_id) & 0xFFFF_FFFF_FFFF_FFFF,  # Flower stores uint64 as sint64
            name=str(name or "-"),
            status=str(status),
            online=status == "online" and (online_until or 0) > now,
            public_key=bytes(public_key or b""),
        )
        for node_id, name, status, online_until, public_key in rows
    ]


def sync_invitations(
    connection: ControlConnection, state: StateLayout, certs: Path
) -> dict[str, Any]:
    """Make the SuperLink's nodes what clients.json says: register every invited key it lacks,
    unregister every node whose key is no longer invited. Returns name -> {public_key, node_id}
    (also written to STATE/registered.json) and refreshes the site-status files."""
    invited = client_public_keys(certs)
    wanted: dict[bytes, str] = {}
    lines: dict[str, bytes] = {}
    for name, path in invited.items():
        key, lines[name] = load_public_key(path)
        wanted[flower_public_key_bytes(key)] = name
    nodes = [node for node in known_nodes(state.database) if node.status != "unregistered"]
    for node in nodes:
        if node.public_key not in wanted:
            flwr_control.unregister_node(connection, node.node_id)
            log.warning("unregistered node %s (%s): its key is no longer invited", node.node_id,
                        node.name)  # fmt: skip
    present = {node.public_key: node.node_id for node in nodes}
    record: dict[str, Any] = {}
    for key, name in wanted.items():
        node_id = present.get(key)
        if node_id is None:
            node_id = flwr_control.register_node(connection, invited[name], name)
            log.info("registered client %s (node %s)", name, node_id)
        record[name] = {"public_key": lines[name].split()[1].decode(), "node_id": node_id}
    write_json_atomically(state.registered, record)
    revoked = {name: load_public_key(path)[1] for name, path in revoked_clients(certs).items()}
    write_site_status(state.site_status, lines, revoked)
    return record


def write_site_status(
    path: Path, invited: Mapping[str, bytes], revoked: Mapping[str, bytes]
) -> None:
    """The nginx map: each invited or revoked key's status page says which; a key not listed was
    never invited. Only a holder of the public key can form its address, so the membership
    list itself stays unknown to the outside."""
    entries = [(line, SITE_STATUS_INVITED) for line in invited.values()]
    entries += [(line, SITE_STATUS_REVOKED) for line in revoked.values()]
    text = "".join(
        f"{SITE_STATUS_PREFIX}{status_name(line)} {status};\n" for line, status in entries
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    write_atomically(path, text.encode())


def serve(coordinator: Coordinator, should_stop: threading.Event) -> None:
    """Block until asked to stop or a process dies; follow clients.json while running; always
    stops everything it started."""
    certs = coordinator.settings.certs
    manifest = CertsLayout(certs).manifest if certs else None
    status_map = StateLayout(coordinator.settings.state).site_status
    seen, served = _modified(manifest), _modified(status_map)
    try:
        while not should_stop.wait(SYNC_EVERY_SECONDS):
            dead = coordinator.dead_process()
            if dead is not None:
                raise CoordinatorError(
                    f"{dead.name} exited unexpectedly (code {dead.popen.returncode}); see "
                    f"{dead.log_path}; the coordinator stopped everything it started"
                )
            if certs is not None and _modified(manifest) != seen:
                seen = _modified(manifest)
                _resync(coordinator, certs)
            if _modified(status_map) != served:  # also written by `coordinator run`
                served = _modified(status_map)
                coordinator.reload_proxy()
    finally:
        coordinator.stop()


def _modified(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path else None
    except OSError:
        return None


def _resync(coordinator: Coordinator, certs: Path) -> None:
    """A bad clients.json while running is logged and retried on its next change, never fatal:
    the federation keeps running with the membership it had."""
    state = StateLayout(coordinator.settings.state)
    try:
        coordinator.registered = sync_invitations(coordinator.connection, state, certs)
    except (CertificateError, ControlError) as error:
        log.error("clients.json changed but could not be applied: %s", error)
        return
    status = read_status(state.root) or {}
    if status.get("pid") == os.getpid():
        write_json_atomically(
            state.status_file, {**status, "clients": sorted(coordinator.registered)}
        )
    log.info("membership now: %s", ", ".join(sorted(coordinator.registered)) or "nobody")


def abort_on_sigterm() -> None:
    """While starting, SIGTERM aborts like Ctrl-C, so the cleanup in `start_coordinator` runs."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------ stop


def process_start_ticks(pid: int) -> int | None:
    """When the kernel started `pid` (clock ticks since boot, /proc/PID/stat field 22): with the
    pid it names one process for ever, so a recycled pid is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def proven_coordinator(status: Mapping[str, Any], state: Path) -> int | None:
    """The pid in coordinator.json if /proc proves it is that `coordinator start` (same start
    time, a command line naming `coordinator start` and this state directory), else None."""
    pid = int(status["pid"])
    recorded = status.get("start_ticks")
    if recorded is None or process_start_ticks(pid) != recorded:
        return None
    argv = _cmdline(pid)
    if "coordinator" not in argv or "start" not in argv:
        return None
    given = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--state"]
    given += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--state=")]
    cwd = Path(f"/proc/{pid}/cwd")
    with contextlib.suppress(OSError):
        cwd = cwd.resolve()
    if not any((cwd / path).resolve() == state for path in given):
        return None
    return pid


def stop_coordinator(state: Path, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
    """SIGTERM the running `coordinator start` for `state`; returns its pid (None: none ran).

    Only a process /proc proves to be that coordinator is signalled (`proven_coordinator`); a
    stale coordinator.json whose pid now belongs to something else is refused, naming it.
    """
    state = state.resolve()
    status = running_status(state)
    if status is None:
        return None
    pid = proven_coordinator(status, state)
    if pid is None:
        raise CoordinatorError(
            f"{StateLayout(state).status_file}: pid {status['pid']} is not the coordinator "
            f"started for {state} (a stale file, and the pid now belongs to another process: "
            f"{' '.join(_cmdline(int(status['pid'])))[:80] or 'unknown'}); nothing was signalled"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        ticks = status.get("process_start_ticks", {})
        for name, child in status.get("processes", {}).items():
            if ticks.get(name) is not None and process_start_ticks(int(child)) == ticks[name]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(child), signal.SIGKILL)
        raise CoordinatorError(
            f"coordinator pid {pid} did not stop within {timeout:.0f}s and was killed; see "
            f"{StateLayout(state).logs}"
        )
    return pid
