"""Helpers for tests/test_deployment.py: real `confide` processes on 127.0.0.1, always stopped.

Every process a test starts runs in its own session and is stopped with its whole process group;
`leftovers(marker)` finds anything still running whose command line or environment mentions a
test's temporary directory (Flower's helpers inherit FLWR_HOME from us), so a test can assert
that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.certificates.issuing import init_certs
from common.certificates.layout import CertsLayout
from common.processes import free_port, pid_alive
from common.schema import load_schema
from common.tasks import BUNDLED_SCHEMAS, load_heart_rows

CONFIDE = [sys.executable, "-m", "confide"]
START_TIMEOUT = 240.0  # a shared 2-core CI machine can be slow to import torch and Flower
SITES = {"hospital-1": ("cleveland", "hospital"), "bank-1": ("hungary", "bank")}
REHEARSAL_POLICY = "require-dp = false\nmax-epsilon = 8.0\n"  # runs without DP are accepted


def confide(
    *args: str, timeout: float = 180, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CONFIDE, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def require_nginx() -> None:
    """The locked control plane needs nginx; its absence is a setup error, never a skip."""
    if not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")):
        pytest.fail("nginx is not installed: run .ci/setup-system (apt-get install nginx-light)")


def write_site(path: Path, site: str) -> Path:
    """One real hospital's heart records, in the columns of the federation's schema."""
    columns = list(load_schema(BUNDLED_SCHEMAS["heart"]).columns())
    rows = [row for row in load_heart_rows() if row["hospital"] == site]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------------------------ processes


class Background:
    """A `confide` command running in its own session; `stop()` ends its whole process group."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [*CONFIDE, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def terminate(self) -> None:
        """Ask the whole group to stop without waiting, so that several stop side by side."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, grace: float = 60.0) -> int | None:
        if self.alive():
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return self.popen.returncode


def leftovers(marker: str) -> list[str]:
    """Live (non-zombie) processes whose command line or environment mentions `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (marker in cmdline or marker in environ) and pid_alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def assert_nothing_left(marker: str, timeout: float = 30.0) -> None:
    """Processes may take a moment to exit after their group was signalled."""
    deadline = time.monotonic() + timeout
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers(marker), f"processes left running: {leftovers(marker)}"


# ------------------------------------------------------------------------------ federation


@dataclass
class Federation:
    """A TLS coordinator and two authenticated sites (a hospital and a bank) on one machine."""

    root: Path
    certs: CertsLayout
    state: Path
    port: int
    coordinator: Background | None = None
    sites: dict[str, Background] = field(default_factory=dict)
    site_policy: str = REHEARSAL_POLICY  # "": the strict built-in defaults

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> dict:
        try:
            return json.loads((self.state / "coordinator.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_coordinator(self) -> None:
        self.launch_coordinator()
        self.wait_for_coordinator()

    def launch_coordinator(self) -> None:
        """Start it without waiting: a test can prepare its sites while it boots."""
        self.coordinator = Background(
            ["coordinator", "start", "--certs", str(self.certs.root), "--state", str(self.state),
             "--host", "127.0.0.1", "--port", str(self.port)],
            self.root / "coordinator.log",
        )  # fmt: skip

    def wait_for_coordinator(self) -> None:
        coordinator = self.coordinator
        assert coordinator is not None, "launch_coordinator() first"

        def ready() -> bool:  # this process's status: a killed predecessor's file says "ready" too
            status = self.status()
            return status.get("status") == "ready" and status.get("pid") == coordinator.popen.pid

        wait_for(lambda: ready() or not coordinator.alive(), START_TIMEOUT, "the coordinator")
        assert ready(), coordinator.output()[-3000:]

    def policy_file(self) -> str:
        """The sites' policy file ("" for none: the strict defaults refuse runs without DP)."""
        if not self.site_policy:
            return ""
        path = self.root / "site-policy.toml"
        path.write_text(self.site_policy)
        return str(path)

    def join_args(self, name: str, **overrides: str) -> list[str]:
        site, role = SITES.get(name, ("cleveland", "hospital"))
        options = {
            "--role": role,
            "--task": "heart",
            "--data": str(self.root / f"{site}.csv"),
            "--coordinator": self.address,
            "--ca": str(self.certs.ca_cert),
            "--key": str(self.certs.client_private_key(name)) if name in SITES else "",
            "--name": name,
            "--work-dir": str(self.root / "nodes" / name),
            "--policy": self.policy_file(),
        }
        options.update(overrides)
        return ["join", *[item for key, value in options.items() if value for item in (key, value)]]

    def start_site(self, name: str) -> None:
        self.start_sites([name])

    def start_sites(self, names: list[str]) -> None:
        """Join side by side: a join mostly imports torch and waits on TLS and Flower's polls, so
        two at once on 2 cores take little longer than one."""
        for name in names:
            self.sites[name] = Background(self.join_args(name), self.root / f"join-{name}.log")
        for name in names:
            site = self.sites[name]
            wait_for(lambda site=site: "joined as node" in site.output() or not site.alive(),
                     START_TIMEOUT, f"{name} to join")  # fmt: skip
            assert "joined as node" in site.output(), site.output()[-3000:]

    def stop(self) -> None:
        """Every site asked at once, then each awaited; the coordinator last, as an operator would."""
        for site in self.sites.values():
            site.terminate()
        for site in self.sites.values():
            site.stop()
        if self.coordinator is not None:
            self.coordinator.stop()


def make_federation(root: Path) -> Federation:
    """Certificates for 127.0.0.1 only (so `localhost` is NOT a SAN) and two invited sites."""
    certs = init_certs(root / "certs", ["127.0.0.1"], list(SITES))
    for site, _role in SITES.values():
        write_site(root / f"{site}.csv", site)
    return Federation(root=root, certs=certs, state=root / "state", port=free_port())


# ------------------------------------------------------------------------------ certificates


@contextlib.contextmanager
def running_federation(root: Path, site_policy: str = REHEARSAL_POLICY) -> Iterator[Federation]:
    """A TLS coordinator and both invited sites; afterwards everything stopped, and checked so."""
    require_nginx()
    fed = make_federation(root)
    fed.site_policy = site_policy
    try:
        fed.start_coordinator()
        fed.start_sites(list(SITES))
        yield fed
    finally:
        fed.stop()
        assert_nothing_left(str(root))


def reissue_expired(certs: CertsLayout, target: Path, *, ca: bool = False) -> None:
    """Replace `target` with an expired certificate: the CA itself, or a server cert signed by
    it (same key as before, so only the dates are wrong)."""
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    old = x509.load_pem_x509_certificate(target.read_bytes())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.subject if ca else ca_cert.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
    )
    for extension in old.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert = builder.sign(ca_key, hashes.SHA384())
    target.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def common_name(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
