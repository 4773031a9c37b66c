"""`confide join`: check everything a site controls, then connect its SuperNode to the coordinator.

Order matters for a hospital's ops person: the data file is checked against the federation's
schema first (the same `DataFileError` as `confide simulate`, listing every problem), then the
key and CA files, then one TLS handshake proves the coordinator is who it claims to be. Only then
does `flower-supernode` start, with TLS, its own key and the site's node config (`data-path`,
`name`, `role`, `ledger-path`). A failure at any step starts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.local_data import DATA_PATH_KEY, LEDGER_PATH_KEY, NAME_KEY
from common.certificates import CertificateError, verify_server_certificate
from common.file_reading import read_named_file
from common.flower_args import FlowerArgumentError, key_values
from common.partition import site_split
from common.processes import (
    ManagedProcess,
    ProcessError,
    child_environment,
    find_executable,
    free_port,
    is_loopback,
    last_error_line,
)
from common.run_config import RunConfig, RunConfigError
from common.site_data import load_site_data
from common.tasks import task_schema

log = logging.getLogger(__name__)

ROLES = ("hospital", "bank")
ROLE_KEY = "role"
DEFAULT_TASK = {"hospital": "heart", "bank": "bank"}
CONNECT_TIMEOUT_SECONDS = 10.0
# What a SuperNode's dying words mean for the person running it (flwr 1.42 exits with status 1
# and logs the reason, e.g. "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode").
LOG_HINTS = (
    (
        "Failed to activate SuperNode",
        "the coordinator refused this client: the key {key} is not registered there (not "
        "invited, or invited after the coordinator started); ask the coordinator's operator to "
        "invite it (`confide certs add-client`) and restart the coordinator, or check you passed "
        "your own key; if this site stopped abruptly under a minute ago, the coordinator still "
        "counts its old connection online: join again in a minute",
    ),
    (
        "400 Bad Request",
        "the coordinator refused plaintext (it requires TLS); drop --insecure and pass --ca",
    ),
    (
        "Unable to parse the private key file",
        "{key}: Flower cannot use this key; pass the clients/NAME.key from `confide certs init`",
    ),
)


class JoinError(RuntimeError):
    """Why this site cannot join, on one line naming the file or setting and the fix."""


@dataclass(frozen=True)
class JoinSettings:
    role: str
    data: Path
    coordinator: str  # HOST:PORT
    ca: Path | None
    key: Path | None
    name: str
    ledger: Path | None = None
    task: str | None = None
    schema: Path | None = None
    insecure: bool = False
    work_dir: Path | None = None


@dataclass(frozen=True)
class JoinPlan:
    """Everything checked: what `flower-supernode` will be started with."""

    argv: list[str]
    env: dict[str, str]
    work_dir: Path
    host: str
    port: int
    records: int


# ---------------------------------------------------------------------------------------- checks


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise JoinError(
            f"--coordinator {address!r}: use HOST:PORT, e.g. coordinator.example.org:9092"
        )
    return host, int(port_text)


def check_data(settings: JoinSettings) -> int:
    """The site's file against the federation's schema; raises DataFileError listing every
    problem (or RunConfigError/SchemaError/PartitionError), returns the number of records."""
    if settings.role not in ROLES:
        raise JoinError(f"--role {settings.role!r}: use one of {', '.join(ROLES)}")
    task = settings.task or DEFAULT_TASK[settings.role]
    values: dict[str, object] = {"task": task}
    if task == "custom" or settings.schema is not None:
        if settings.schema is None:
            raise JoinError("--task custom needs --schema SCHEMA.toml (the federation's schema)")
        values.update(task="custom", **{"data-file": str(settings.data),
                                         "schema-file": str(settings.schema)})  # fmt: skip
    try:
        config = RunConfig.from_mapping(values, source="--task")
    except RunConfigError as error:
        raise JoinError(str(error)) from None
    dataset = load_site_data(
        settings.data, task_schema(config), vocab_size=config.vocab_size,
        max_length=config.max_length,
    )  # fmt: skip
    site_split(config, dataset, settings.name)
    return len(dataset)


def _read(path: Path, what: str, option: str) -> bytes:
    return read_named_file(path, what, f"check {option}", JoinError)


def check_private_key(path: Path) -> None:
    """What flower-supernode needs (an OpenSSH EC key) and what ssh insists on (private mode)."""
    data = _read(path, "private key", "--key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise JoinError(f"{path}: key is password-protected; Flower needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise JoinError(
            f"{path}: not an OpenSSH private key; pass the clients/NAME.key you were sent "
            "(not the .pub file, not a TLS key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(f"{path}: Flower needs an EC key; pass the clients/NAME.key you were sent")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise JoinError(
            f"{path}: private key is readable by other users (mode {mode:04o}); run "
            f"`chmod 600 {path}`"
        )


def check_ca(path: Path) -> None:
    data = _read(path, "CA certificate", "--ca")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise JoinError(
            f"{path}: not a PEM certificate; pass the federation's ca.crt (not a key)"
        ) from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise JoinError(f"{path}: is not a CA certificate; pass the federation's ca.crt")
    now = datetime.now(UTC)
    if now > cert.not_valid_after_utc:
        raise JoinError(
            f"{path}: CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask the "
            "coordinator's operator for the federation's new ca.crt"
        )
    if now < cert.not_valid_before_utc:
        raise JoinError(f"{path}: CA certificate not valid yet; check this machine's clock")


# --------------------------------------------------------------------------- coordinator check


def _connect(host: str, port: int) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise JoinError(
            f"cannot reach the coordinator at {host}:{port} ({reason}); check --coordinator and "
            "that `confide coordinator start` runs there"
        ) from None


def _peer_certificate(host: str, port: int) -> bytes:
    """The certificate the coordinator presents, unverified: verified offline next, for clear
    messages (which CA, which names) instead of a bare handshake failure."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _connect(host, port) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        except (ssl.SSLError, OSError):
            raise JoinError(
                f"the coordinator at {host}:{port} does not speak TLS (a plaintext --insecure "
                "coordinator, or not a coordinator); Confide refuses plaintext, ask its operator"
            ) from None
    if not der:
        raise JoinError(f"the coordinator at {host}:{port} presented no certificate")
    return der


def check_coordinator(host: str, port: int, ca: Path) -> None:
    """Prove the coordinator's identity with `ca` before any data-bearing process starts."""
    der = _peer_certificate(host, port)
    with tempfile.TemporaryDirectory(prefix="confide-join-") as scratch:
        presented = Path(scratch) / "coordinator.crt"
        cert = x509.load_der_x509_certificate(der)
        presented.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        try:
            verify_server_certificate(ca, presented, host)
        except CertificateError as error:
            label = f"the certificate presented by {host}:{port}"
            raise JoinError(str(error).replace(str(presented), label)) from None
    context = ssl.create_default_context(cafile=str(ca))
    with _connect(host, port) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLError as error:
            raise JoinError(
                f"TLS handshake with {host}:{port} failed ({error.reason or error}); check --ca"
            ) from None


def check_plaintext_coordinator(host: str, port: int) -> None:
    """--insecure: refuse to talk plaintext to a coordinator that offers TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _connect(host, port) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                speaks_tls = True
        except (ssl.SSLError, OSError):
            speaks_tls = False
    if speaks_tls:
        raise JoinError(
            f"the coordinator at {host}:{port} requires TLS; drop --insecure and pass --ca ca.crt"
        )


# ---------------------------------------------------------------------------------------- plan


def default_work_dir(name: str) -> Path:
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "confide" / "nodes" / name


def prepare_join(settings: JoinSettings) -> JoinPlan:
    """All checks in order (data, key, CA, coordinator); raises before anything starts."""
    host, port = parse_address(settings.coordinator)
    if settings.insecure and not is_loopback(host):
        raise JoinError(
            f"--insecure with --coordinator {host}: plaintext is refused for a non-loopback "
            "address; drop --insecure and pass --ca ca.crt"
        )
    if settings.insecure and settings.ca is not None:
        raise JoinError("--insecure and --ca contradict each other; drop --insecure")
    if not settings.insecure and settings.ca is None:
        raise JoinError("--ca is required: the federation's ca.crt, to check the coordinator")
    if not settings.insecure and settings.key is None:
        raise JoinError("--key is required: your clients/NAME.key from the coordinator's operator")
    records = check_data(settings)
    node_config: dict[str, object] = {
        DATA_PATH_KEY: str(settings.data.resolve()),
        NAME_KEY: settings.name,
        ROLE_KEY: settings.role,
    }
    if settings.ledger is not None:
        node_config[LEDGER_PATH_KEY] = str(settings.ledger.expanduser().resolve())
    try:
        node_config_text = key_values(node_config)
    except FlowerArgumentError as error:
        raise JoinError(str(error)) from None
    try:
        supernode = find_executable("flower-supernode", "reinstall Confide: pip install -e .")
    except ProcessError as error:
        raise JoinError(str(error)) from None
    argv = [str(supernode), "--superlink", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if settings.insecure:
        check_plaintext_coordinator(host, port)
        argv.append("--insecure")
    else:
        assert settings.ca is not None and settings.key is not None
        check_private_key(settings.key)
        check_ca(settings.ca)
        check_coordinator(host, port, settings.ca)
        argv += ["--root-certificates", str(settings.ca.resolve())]
        argv += ["--auth-supernode-private-key", str(settings.key.resolve())]
    argv += ["--node-config", node_config_text]
    # The SuperNode's own Runtime API (its ClientApp processes call it): loopback, a free port,
    # so several sites can share one machine in a rehearsal.
    argv += ["--host", "127.0.0.1", "--port", str(free_port())]
    work_dir = (settings.work_dir or default_work_dir(settings.name)).resolve()
    env = child_environment({"FLWR_HOME": str(work_dir / "flwr-home")})
    return JoinPlan(argv, env, work_dir, host, port, records)


# ----------------------------------------------------------------------------------------- run


def start_supernode(plan: JoinPlan, name: str) -> ManagedProcess:
    plan.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return ManagedProcess(
        f"flower-supernode ({name})", plan.argv, plan.work_dir / "supernode.log", env=plan.env
    )


def node_id(process: ManagedProcess) -> str | None:
    """The node ID Flower logs once the coordinator accepted this client."""
    for line in reversed(process.log_tail(200).splitlines()):
        if "SuperNode ID:" in line:
            return line.rsplit(":", 1)[1].strip()
    return None


def explain_exit(process: ManagedProcess, key: Path | None) -> str:
    """One line for a SuperNode that stopped on its own."""
    tail = process.log_tail(60)
    for marker, hint in LOG_HINTS:
        if marker in tail:
            return hint.format(key=key)
    return (
        f"flower-supernode exited with code {process.popen.returncode}: "
        f"{last_error_line(tail)}; see {process.log_path}"
    )


def supervise(
    process: ManagedProcess,
    should_stop: Callable[[], bool],
    on_connected: Callable[[str], None],
) -> int | None:
    """Run until asked to stop or the SuperNode exits; returns its exit code (None: we stopped
    it). Always leaves nothing running."""
    announced = False
    try:
        while process.alive() and not should_stop():
            if not announced:
                identity = node_id(process)
                if identity:
                    announced = True
                    on_connected(identity)
            time.sleep(0.5)
        if process.alive():
            return None
        return process.popen.returncode
    finally:
        with contextlib.suppress(Exception):
            process.stop()
