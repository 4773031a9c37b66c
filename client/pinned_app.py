"""Is a run's app package the app this site installed? Compared file by file, never executed.

A coordinator ships each run as a Flower app package (FAB, a zip). A site runs only the Confide it
installed (`client/site_executor.py`), so a package that differs is refused with a reason that
names the files. "Same app" means: the package holds exactly the files Flower's own build takes
from the installed project (the `flwr build` rules: `*.py`, `*.toml`, `*.md`, `*.json`, ... minus
what `.gitignore` excludes), each with identical bytes; `pyproject.toml` compares by its settings,
because Flower rewrites that file when it builds (and drops `[tool.flwr.federations]`). So a
coordinator rebuilding the same release passes whatever zip settings its Flower used, and any
changed, added or missing file fails, documentation included: a package is one release or another.
The package's own `.info/` manifest is ignored: every file is hashed here, nothing is trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.run_config import PROJECT_ROOT

MAX_UNPACKED_BYTES = 64 * 1024 * 1024  # Flower caps a packed FAB at 10 MB; a zip bomb stops here
MAX_FILES = 10_000
SKIPPED_PREFIX = ".info/"  # Flower's manifest of the package: derived, so never trusted
CONFIG_FILE = "pyproject.toml"
SHOWN_DIFFERENCES = 3
SHORT_HASH = 12


class AppPackageError(ValueError):
    """The package cannot be read as a Flower app package (not a zip, too big, duplicate names)."""


@dataclass(frozen=True)
class AppFiles:
    """An app as a set of files: path -> sha256 of its contents (of its settings for pyproject)."""

    files: Mapping[str, str]

    @property
    def digest(self) -> str:
        """One hash for the whole app; equal for equal file sets, whatever the zip looked like."""
        lines = "".join(f"{path}\0{digest}\n" for path, digest in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()


def _config_digest(content: bytes) -> str:
    """pyproject.toml by what it says: Flower's build re-serialises it and drops federations."""
    try:
        config = tomllib.loads(content.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return hashlib.sha256(content).hexdigest()
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    canonical = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_app_package(package: bytes) -> AppFiles:
    """Hash every file of a packed app, reading the zip in memory (nothing is extracted)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(package))
    except zipfile.BadZipFile:
        raise AppPackageError("not a zip archive") from None
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if len(entries) > MAX_FILES:
            raise AppPackageError(f"{len(entries)} files, more than {MAX_FILES}")
        if sum(info.file_size for info in entries) > MAX_UNPACKED_BYTES:
            raise AppPackageError(f"unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB")
        files: dict[str, str] = {}
        for info in entries:
            if info.filename.startswith(SKIPPED_PREFIX):
                continue
            if info.filename in files:
                raise AppPackageError(f"{info.filename} appears twice")
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, OSError, NotImplementedError) as error:
                raise AppPackageError(f"{info.filename}: {error}") from None
            files[info.filename] = (
                _config_digest(content)
                if info.filename == CONFIG_FILE
                else hashlib.sha256(content).hexdigest()
            )
    return AppFiles(files)


def differences(received: AppFiles, installed: AppFiles) -> list[str]:
    """What the received app changes, file by file, sorted by path."""
    found = []
    for path in sorted(set(received.files) | set(installed.files)):
        if path not in installed.files:
            found.append(f"{path} added")
        elif path not in received.files:
            found.append(f"{path} missing")
        elif received.files[path] != installed.files[path]:
            found.append(f"{path} differs")
    return found


def refusal(package: bytes, installed: AppFiles) -> str | None:
    """None when `package` is the installed app; otherwise the reason, on one line, for both the
    site's log and the coordinator's run record."""
    try:
        received = read_app_package(package)
    except AppPackageError as error:
        return (
            f"refused: the run's app package is unreadable ({error}); this site runs only the "
            f"app it installed (sha256 {installed.digest[:SHORT_HASH]})"
        )
    found = differences(received, installed)
    if not found:
        return None
    shown = ", ".join(found[:SHOWN_DIFFERENCES])
    more = f" and {len(found) - SHOWN_DIFFERENCES} more" if len(found) > SHOWN_DIFFERENCES else ""
    return (
        f"refused: the run's app package (sha256 {received.digest[:SHORT_HASH]}) is not the app "
        f"this site installed (sha256 {installed.digest[:SHORT_HASH]}): {shown}{more}"
    )


def installed_app(root: Path = PROJECT_ROOT) -> AppFiles:
    """The installed Confide as Flower would pack it: the same build rules as the coordinator's
    `flwr run`, so the same release gives the same files on both sides."""
    from client.flower_runtime import build_app_package

    return read_app_package(build_app_package(root))
