"""A site's own key pair: made at the site, only its public half ever leaves.

Flower authenticates each SuperNode by an EC key pair in OpenSSH format: `flower-supernode` loads
the private key with `load_ssh_private_key(data, None)` (flwr/supernode/cli/flower_supernode.py)
and `flwr supernode register` loads the public key with `load_ssh_public_key`, requiring an EC key
on a NIST curve (flwr/cli/supernode/register.py). Flower itself generates SECP384R1 keys, so we do
too. The fingerprint is what `ssh-keygen -lf NAME.pub` prints, so operator and site can compare
it over the phone before the operator invites the key.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.atomic_file import write_atomically
from common.file_reading import read_named_file

CURVE = ec.SECP384R1
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_MAX_PUBLIC_KEY_BYTES = 4096
# Where a coordinator's front door answers "invited" / "revoked" for a key (see `status_name`).
SITE_STATUS_PREFIX = "/confide/site-status/"


class CertificateError(ValueError):
    """A certificate or key problem, stated as one line naming the file and the fix."""


@dataclass(frozen=True)
class SiteKeyPair:
    private_key: Path
    public_key: Path
    fingerprint: str


def check_site_name(name: str) -> str:
    # The name becomes a file name and a CLI argument: no path separators, no leading '-'.
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
        raise CertificateError(
            f"site (client) name {name!r} is invalid; use 1-63 of a-z, 0-9 and '-', not starting with '-'"
        )
    return name


def key_pair_bytes(name: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key PEM, OpenSSH public key line), the formats Flower loads."""
    key = ec.generate_private_key(CURVE())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # flower-supernode loads it with password=None
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private_pem, public_line + f" confide-{name}\n".encode()


def generate_site_key(out: Path, name: str) -> SiteKeyPair:
    """Write OUT/NAME.key (0600 from its first byte) and OUT/NAME.pub; never overwrite either."""
    check_site_name(name)
    out = Path(out)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise CertificateError(
                f"{path}: already exists, refusing to overwrite a site key; pick another --out "
                "or --name, or move it away first"
            )
    if out.exists() and not out.is_dir():
        raise CertificateError(f"{out}: exists and is not a directory; pass another --out")
    private_pem, public_line = key_pair_bytes(name)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_new_key(private_path, private_pem, 0o600)
    try:
        write_new_key(public_path, public_line, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)  # all or nothing
        raise
    return SiteKeyPair(private_path, public_path, fingerprint(public_line))


def load_public_key(path: Path) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    """(key, the one-line OpenSSH text to store) of a site's public key file, or one line
    saying what it is instead and what to pass."""
    data = read_named_file(path, "public key", "pass the NAME.pub that `confide certs keygen` "
                           "printed at the site", CertificateError)  # fmt: skip
    hint = "pass the NAME.pub made by `confide certs keygen --out DIR --name NAME` at the site"
    if len(data) > _MAX_PUBLIC_KEY_BYTES or b"PRIVATE KEY" in data:
        raise CertificateError(
            f"{path}: not an OpenSSH public key (a private key? never send it); {hint}"
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{path}: not an OpenSSH public key line; {hint}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise CertificateError(
            f"{path}: not an EC key on a NIST curve (Flower accepts only those, e.g. "
            f"ecdsa-sha2-nistp384); {hint}"
        )
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return key, line + b"\n"


def fingerprint(public_line: bytes) -> str:
    """`SHA256:<base64>` over the key blob, the same string `ssh-keygen -lf` prints."""
    blob = base64.b64decode(public_line.split()[1])
    digest = hashes.Hash(hashes.SHA256())
    digest.update(blob)
    return "SHA256:" + base64.b64encode(digest.finalize()).decode().rstrip("=")


def status_name(public_line: bytes) -> str:
    """A key's SHA-256 fingerprint, URL-safe: the name under which a coordinator says whether
    the key is invited or revoked (server/coordinator/coordinator.py `write_site_status`)."""
    digest = fingerprint(public_line).removeprefix("SHA256:")
    return base64.urlsafe_b64encode(base64.b64decode(digest + "=")).decode().rstrip("=")


def flower_public_key_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """How Flower's SuperLink stores a node's key (flwr.supercore.primitives.asymmetric)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_new_key(path: Path, data: bytes, mode: int) -> None:
    """Write a key file atomically; an existing one (a racing writer's too) is never replaced."""
    try:
        write_atomically(path, data, mode)
    except FileExistsError:
        raise CertificateError(
            f"{path}: already exists, refusing to overwrite a key; move it away first"
        ) from None
