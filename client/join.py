"""`confide join`: check everything a site controls, then connect its SuperNode to the coordinator.

Order matters for a hospital's ops person: the data file is checked against the federation's
schema first (the same `DataFileError` as `confide simulate`, listing every problem), then the
key and CA files, then one TLS handshake proves the coordinator is who it claims to be. Only then
does `flower-supernode` start, with TLS, its own key and the site's node config (`data-path`,
`name`, `role`, `ledger-path`), together with the site executor (`client/site_executor.py`), which
answers every message with the ClientApp installed here and refuses a run whose app package is not
that app. A failure at any step starts nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import os
import re
import secrets
import socket
import ssl
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.local_data import DATA_PATH_KEY, LEDGER_PATH_KEY, NAME_KEY, default_site_home
from client.privacy.policy import POLICY_PATH_KEY
from client.site_inputs import SCHEMA_PATH_KEY
from common.atomic_file import write_atomically
from common.certificates.checking import is_ca_certificate, verify_server_certificate
from common.file_reading import read_named_file
from common.flower_args import FlowerArgumentError, key_values
from common.hf_model import hf_text_encoder
from common.partition import MIN_RECORDS_PER_CLIENT
from common.processes import (
    ManagedProcess,
    ProcessError,
    child_environment,
    free_port,
    is_loopback,
    last_error_line,
)
from common.run_config import RunConfig, RunConfigError
from common.site_data import load_site_data
from common.site_keys import SITE_STATUS_PREFIX, CertificateError, fingerprint, status_name
from common.site_policy import PolicyRefusal, SitePolicy, policy_toml
from common.tasks import task_schema

log = logging.getLogger(__name__)

ROLES = ("hospital", "bank")
ROLE_KEY = "role"
DEFAULT_TASK = {"hospital": "heart", "bank": "bank"}
CONNECT_TIMEOUT_SECONDS = 10.0
RUNTIME_SECRET_FILE = "runtime-api.secret"
EXECUTOR_LOG = "site-executor.log"
# What a SuperNode's dying words mean for the person running it (flwr 1.42 exits with status 1
# and logs the reason, e.g. "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode").
# "{refusal}": the coordinator refused this key; `refusal_case` asks it which case it is.
LOG_HINTS = (
    ("Failed to activate SuperNode", "{refusal}"),
    ("401 Unauthorized", "{refusal}"),
    # Flower's SuperNode stops itself "gracefully" when the coordinator rejects its heartbeat,
    # which is what a revocation while online looks like (a stop we asked for is not explained).
    ("SuperNode terminated gracefully", "{refusal}"),
    (
        "400 Bad Request",
        "the coordinator refused plaintext (it requires TLS); drop --insecure and pass --ca",
    ),
    (
        "Unable to parse the private key file",
        "{key}: Flower cannot use this key; pass the NAME.key made by `confide certs keygen`",
    ),
)
# Flower accepts a SuperNode's signed timestamp from 5 s ahead to 305 s behind its own clock
# (flwr.common.constant SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE); HTTP dates have 1 s steps.
CLOCK_AHEAD_LIMIT_SECONDS = 4.0
CLOCK_BEHIND_LIMIT_SECONDS = 300.0
# A refusal as the site executor logs it (its format: client/site_executor.py `main`): the
# ClientApp's "NAME refuses: WHY" (client/app.py `_refusal`), or the executor's own
# "run ID: refused: WHY" for a package that is not the installed app.
REFUSAL_LINE = re.compile(
    r"^\S+ \S+ (?:WARNING client\.app: .+? refuses: (?P<app>.+)"
    r"|ERROR confide\.site_executor: run \S+: (?P<executor>refused: .+))$"
)


POLICY_FILE = "site-policy.toml"


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
    policy: SitePolicy = field(default_factory=SitePolicy)  # the site's own (`--policy FILE`)


@dataclass(frozen=True)
class JoinPlan:
    """Everything checked: what `flower-supernode` and the site executor will be started with."""

    argv: list[str]
    env: dict[str, str]
    work_dir: Path
    host: str
    port: int
    records: int
    executor_argv: list[str]
    runtime_secret: Path  # shared by the two: only the executor may claim this site's messages
    policy_file: Path | None = None  # the site's effective policy, which its ClientApp reads
    policy_text: str = ""  # ...written there when the site starts
    ledger: Path | None = None  # the site's own privacy ledger


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
        max_length=config.max_length, text_encoder=hf_text_encoder(config.model, config.max_length),
    )  # fmt: skip
    if len(dataset) < MIN_RECORDS_PER_CLIENT:
        raise JoinError(
            f"{settings.data}: holds {len(dataset)} record(s); a site needs at least "
            f"{MIN_RECORDS_PER_CLIENT} (one to train on, one to evaluate on)"
        )
    try:  # here, on the site's own machine, the exact count is the operator's to see
        settings.policy.check_delta(round(len(dataset) * (1 - settings.policy.test_fraction)))
    except PolicyRefusal as error:
        raise JoinError(str(error)) from None
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
            f"{path}: not an OpenSSH private key; pass the NAME.key made by `confide certs "
            "keygen` (not the .pub file, not a TLS key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(
            f"{path}: Flower needs an EC key; make one with `confide certs keygen --out DIR "
            "--name NAME` and have its .pub invited"
        )
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
    if not is_ca_certificate(cert):
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


def check_site_executor() -> None:
    """The executor borrows Flower internals (client/flower_runtime.py): on a Flower it was not
    written for, say so before anything starts."""
    try:
        import client.flower_runtime  # noqa: F401 - importing it checks the flwr version
    except ImportError as error:
        raise JoinError(str(error)) from None


# ---------------------------------------------------------------------------------------- plan


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
    check_site_executor()
    records = check_data(settings)
    node_config: dict[str, object] = {
        DATA_PATH_KEY: str(settings.data.resolve()),
        NAME_KEY: settings.name,
        ROLE_KEY: settings.role,
    }
    work_dir = (settings.work_dir or default_site_home(settings.name)).resolve()
    policy_file = work_dir / POLICY_FILE
    ledger = settings.ledger or work_dir / "privacy-ledger.json"  # one per site, never shared
    node_config[LEDGER_PATH_KEY] = str(ledger.expanduser().resolve())
    node_config[POLICY_PATH_KEY] = str(policy_file)
    if settings.schema is not None:  # a custom task: the site validates against its own copy
        node_config[SCHEMA_PATH_KEY] = str(settings.schema.resolve())
    try:
        node_config_text = key_values(node_config)
    except FlowerArgumentError as error:
        raise JoinError(str(error)) from None
    superlink = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv = [sys.executable, "-m", "client.supernode_launcher", "--superlink", superlink]
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
    # The SuperNode's own Runtime API (the site executor calls it): loopback, a free port, so
    # several sites can share one machine in a rehearsal.
    runtime_api = f"127.0.0.1:{free_port()}"
    argv += ["--host", "127.0.0.1", "--port", runtime_api.rsplit(":", 1)[1]]
    secret = work_dir / RUNTIME_SECRET_FILE
    # Pinned app: the SuperNode spawns no ClientApp (`--isolation process`); Confide's executor
    # claims each message and runs the ClientApp installed here, never the coordinator's package.
    argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    executor_argv = [sys.executable, "-I", "-u", "-m", "client.site_executor",
                     "--runtime-api", runtime_api, "--secret-file", str(secret)]  # fmt: skip
    env = child_environment({"FLWR_HOME": str(work_dir / "flwr-home")})
    return JoinPlan(
        argv, env, work_dir, host, port, records, executor_argv, secret,
        policy_file=policy_file, policy_text=policy_toml(settings.policy),
        ledger=ledger.expanduser().resolve(),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- run


class LogFollower:
    """The lines a log file gains after this is made, each once it is complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as log_file:
                log_file.seek(self._offset)
                data = log_file.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


def refusals(lines: list[str]) -> list[str]:
    """The reason of each refusal among a site executor's log lines."""
    matches = (REFUSAL_LINE.match(line) for line in lines)
    return [match["app"] or match["executor"] for match in matches if match]


@dataclass
class Site:
    """A joined site's two processes: the SuperNode (coordinator link, loopback Runtime API) and
    the executor that answers its messages with the installed ClientApp. One does not outlive the
    other: `alive()` is both, and the first to stop is remembered for `explain_exit`."""

    supernode: ManagedProcess
    executor: ManagedProcess
    executor_log: LogFollower  # from where this start's lines begin
    exited: ManagedProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.supernode.log_path

    def alive(self) -> bool:
        if self.exited is None:
            self.exited = next((p for p in (self.supernode, self.executor) if not p.alive()), None)
        return self.exited is None

    def stop(self) -> None:
        self.executor.stop()
        self.supernode.stop()


def write_site_policy(plan: JoinPlan) -> None:
    """The site's effective policy, where its ClientApp reads it (mode 0600, atomically)."""
    plan.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if plan.policy_file is not None:
        write_atomically(plan.policy_file, plan.policy_text.encode(), 0o600)


def start_supernode(plan: JoinPlan, name: str) -> Site:
    """Start the SuperNode and the site executor, with a fresh secret shared by the two."""
    write_site_policy(plan)
    descriptor = os.open(plan.runtime_secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as secret:
        secret.write(secrets.token_bytes(32))
    supernode = ManagedProcess(
        f"flower-supernode ({name})", plan.argv, plan.work_dir / "supernode.log", env=plan.env
    )
    executor_log = LogFollower(plan.work_dir / EXECUTOR_LOG)  # earlier starts' lines are old
    try:
        executor = ManagedProcess(
            f"site executor ({name})", plan.executor_argv, executor_log.path,
            env=plan.env, cwd=plan.work_dir,
        )  # fmt: skip
    except ProcessError:
        supernode.stop()
        raise
    return Site(supernode, executor, executor_log)


def node_id(site: Site) -> str | None:
    """The node ID Flower logs once the coordinator accepted this client."""
    for line in reversed(site.supernode.log_tail(200).splitlines()):
        if "SuperNode ID:" in line:
            return line.rsplit(":", 1)[1].strip()
    return None


def explain_exit(site: Site, key: Path | None) -> str:
    """One line for a site whose SuperNode or executor stopped on its own."""
    if site.exited is site.executor:
        return (
            f"the site executor exited with code {site.executor.popen.returncode}: "
            f"{last_error_line(site.executor.log_tail(60))}; see {site.executor.log_path}"
        )
    process = site.supernode
    tail = process.log_tail(60)
    for marker, hint in LOG_HINTS:
        if marker in tail:
            refusal = refusal_case(process.argv, key) if "{refusal}" in hint else ""
            return hint.format(key=key, refusal=refusal)
    return (
        f"flower-supernode exited with code {process.popen.returncode}: "
        f"{last_error_line(tail)}; see {process.log_path}"
    )


def refusal_case(argv: list[str], key: Path | None) -> str:
    """Why the coordinator refused this site's key: not invited, revoked, already online, or this
    machine's clock. Asks the coordinator's read-only site-status page (by the key's fingerprint,
    over TLS verified with --ca); falls back to listing the cases when it cannot tell."""
    options = dict(itertools.pairwise(argv))
    coordinator = options.get("--superlink", "")
    ca, key_file = options.get("--root-certificates"), options.get("--auth-supernode-private-key")
    generic = (
        f"the coordinator refused this site's key {key}: it is not invited, was revoked, is "
        "already online from another `confide join` (or this site stopped abruptly under a "
        "minute ago), or this machine's clock is off; ask the operator which"
    )
    if not (coordinator and ca and key_file):
        return generic
    try:
        private = serialization.load_ssh_private_key(Path(key_file).read_bytes(), password=None)
        public_line = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        code, body, server_date = _site_status(coordinator, Path(ca), status_name(public_line))
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm, http.client.HTTPException):
        return generic
    return describe_refusal(code, body, server_date, key, fingerprint(public_line))


def _site_status(coordinator: str, ca: Path, name: str) -> tuple[int, str, datetime | None]:
    host, port = parse_address(coordinator)
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(host, port, context=context,
                                             timeout=CONNECT_TIMEOUT_SECONDS)  # fmt: skip
    try:
        connection.request("GET", f"{SITE_STATUS_PREFIX}{name}")
        response = connection.getresponse()
        body = response.read(100).decode(errors="replace").strip()
        date = response.getheader("Date")
    finally:
        connection.close()
    return response.status, body, parsedate_to_datetime(date) if date else None


def describe_refusal(
    code: int, body: str, server_date: datetime | None, key: Path | None, key_print: str
) -> str:
    """The refusal in words, from the coordinator's answer about this key and its clock."""
    if server_date is not None:
        ahead = (datetime.now(UTC) - server_date).total_seconds()
        if ahead > CLOCK_AHEAD_LIMIT_SECONDS or -ahead > CLOCK_BEHIND_LIMIT_SECONDS:
            return (
                f"clock skew: this machine's clock is {ahead:+.0f} s off the coordinator's, and "
                "Flower refuses signatures more than 5 s ahead or 5 min behind; synchronise the "
                "clock (e.g. `timedatectl set-ntp true`) and join again"
            )
    if code == 404:
        return (
            f"not invited: the coordinator does not know the key {key} ({key_print}); send "
            "its .pub to the operator, who runs `confide certs add-client DIR NAME "
            "--public-key NAME.pub` (it takes effect within seconds, no restart), then join again"
        )
    if code == 200 and body == "revoked":
        return (
            f"revoked: the operator withdrew the invitation of the key {key} ({key_print}); "
            "ask them why; a new invitation needs a new key and name"
        )
    if code == 200 and body == "invited":
        return (
            f"already online: the key {key} is invited, and the coordinator counts it connected "
            "already: another `confide join` with this key is running (stop it), or this site "
            "stopped abruptly under a minute ago (join again in a minute)"
        )
    return (
        f"the coordinator refused this site's key {key} ({key_print}) and its site-status page "
        f"answered {code}; ask the operator"
    )


def supervise(
    site: Site,
    should_stop: Callable[[], bool],
    on_connected: Callable[[str], None],
    on_refusal: Callable[[str], None],
) -> int | None:
    """Run until asked to stop or either process exits; returns that one's exit code (None: we
    stopped them). Each refusal the executor logs goes to `on_refusal` as well, so the person
    running the site sees what it declined, and why, without opening the executor's log.
    Always leaves nothing running."""
    announced = False
    try:
        while True:
            running = site.alive() and not should_stop()
            for reason in refusals(site.executor_log.new_lines()):
                on_refusal(reason)
            if not running:
                break
            if not announced:
                identity = node_id(site)
                if identity:
                    announced = True
                    on_connected(identity)
            time.sleep(0.5)
        if site.exited is None:
            return None
        return site.exited.popen.returncode
    finally:
        with contextlib.suppress(Exception):
            site.stop()
