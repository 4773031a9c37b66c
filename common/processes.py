"""Long-running helper processes (SuperLink, SuperNode, nginx) that never outlive their owner.

Each child gets its own session, so Ctrl-C in a terminal reaches only Confide, which then stops the
children in order; stopping signals the child's whole process group, so the subprocesses Flower
spawns (SuperExec, ServerApp, ClientApp) go with it. On Linux each child also asks the kernel for
SIGTERM when its parent dies (PR_SET_PDEATHSIG), so even a `kill -9` of Confide leaves no orphan
serving a port.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 10.0
_START_MARK = "===== confide: process started"


class ProcessError(RuntimeError):
    """A helper process could not be started or died; one line naming its log file."""


def venv_bin() -> Path:
    """Flower's console scripts live next to this interpreter, whatever PATH says."""
    return Path(sys.executable).parent


def find_executable(name: str, hint: str) -> Path:
    """`name` from this environment first, then PATH; `hint` says how to install it."""
    candidate = venv_bin() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return Path(found)
    raise ProcessError(f"{name}: not found in {venv_bin()} or on PATH; {hint}")


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this venv first on PATH (Flower spawns its helpers by
    name), no telemetry and no update check phoning home from a hospital's network."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """One child process with its own log file, stopped together with its process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log.debug("starting %s: %s", name, " ".join(self.argv))
            log_file.write(f"{_START_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log_file.flush()
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else child_environment(),
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            except OSError as error:
                raise ProcessError(
                    f"{self.argv[0]}: cannot start {name} ({error.strerror}); check it is installed"
                ) from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines this start wrote (earlier starts' lines in the same file excluded)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        text = text.rsplit(_START_MARK, 1)[-1]
        return "\n".join(text.splitlines()[1:][-lines:])

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; returns the exit code."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
        # Whatever is left in the group (a ClientApp mid-round, a stuck child) goes now.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        return self.popen.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all(processes: Sequence[ManagedProcess]) -> None:
    """Stop in reverse start order: the front door closes before what stands behind it."""
    for process in reversed(processes):
        process.stop()


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def is_loopback(host: str) -> bool:
    """Only loopback may ever carry plaintext (`--insecure` experiments)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def port_in_use(host: str, port: int) -> bool:
    """Would a server (SO_REUSEADDR, like nginx and uvicorn) fail to bind host:port?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just had free on `host` (for loopback-only internal services)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, process: ManagedProcess, timeout: float) -> None:
    """Block until `process` accepts TCP connections on host:port; fail fast if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise ProcessError(
                f"{process.name} exited with code {process.popen.returncode} before listening on "
                f"{host}:{port}; see {process.log_path}: {last_error_line(process.log_tail())}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise ProcessError(
        f"{process.name} did not listen on {host}:{port} within {timeout:.0f}s; see "
        f"{process.log_path}"
    )


def last_error_line(text: str) -> str:
    """The most telling line of a log tail: the last one mentioning an error, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "emerg", "failed", "exception")):
            return line
    return lines[-1] if lines else "(empty log)"


def stop_on_signals(should_stop: threading.Event) -> None:
    """Ctrl-C and SIGTERM (systemd, `confide coordinator stop`) both mean a clean stop."""

    def handler(signum: int, _frame: object) -> None:
        should_stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
