"""Check certificates before a process trusts them, and summarise them for an operator.

Each check is what a TLS stack will check later (CA flag, validity, signature, server usage,
host name, key pair), done first so a mistake is one line naming the file and the fix instead of
an opaque gRPC handshake error in the middle of a start.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.certificates.layout import INIT_HINT, CertsLayout, read_certs_file
from common.certificates.manifest import client_public_keys
from common.site_keys import CertificateError, fingerprint, load_public_key


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator needs to eyeball a certificate (`confide certs show`)."""

    path: Path
    subject: str
    issuer: str
    sans: tuple[str, ...]
    sha256_fingerprint: str
    not_after: datetime
    expires_in_days: int


@dataclass(frozen=True)
class ClientKeyInfo:
    """An invited client; the fingerprint equals `ssh-keygen -lf NAME.pub`, for phone checks."""

    name: str
    public_key_path: Path
    sha256_fingerprint: str


def describe(root: Path) -> tuple[list[CertificateInfo], list[ClientKeyInfo]]:
    """Summarise the CA and coordinator certificates and the invited clients' keys."""
    layout = CertsLayout(Path(root))
    now = datetime.now(UTC)
    certs = [_certificate_info(p, now) for p in (layout.ca_cert, layout.server_cert)]
    keys = [
        ClientKeyInfo(name=name, public_key_path=path, sha256_fingerprint=_ssh_fingerprint(path))
        for name, path in client_public_keys(layout.root).items()
    ]
    return certs, keys


def verify_server_certificate(ca_cert: Path, server_cert: Path, host: str) -> None:
    """Check what a client's TLS stack will check, before a run fails with an opaque gRPC error."""
    ca_path, server_path = Path(ca_cert), Path(server_cert)
    ca, server = _load_cert(ca_path), _load_cert(server_path)
    now = datetime.now(UTC)
    _check_is_ca(ca, ca_path)
    _check_validity(ca, ca_path, now)
    _check_validity(server, server_path, now)
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertificateError(
            f"{server_path}: not signed by the CA in {ca_path}; clients trusting that CA will "
            "reject it, so give clients the CA that issued it or reissue it from this CA"
        ) from err
    try:
        usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise CertificateError(
            f"{server_path}: not issued for TLS servers (no serverAuth usage); reissue it"
        )
    if not _host_matches(host, server):
        sans = ", ".join(_sans(server)) or "none"
        raise CertificateError(
            f"{server_path}: host {host!r} is not in its SANs ({sans}); dial one of those or "
            f"{INIT_HINT} --host {host}"
        )


def verify_key_matches_certificate(cert: Path, key: Path) -> None:
    """Catch a swapped/stale key file before the TLS server starts and fails every handshake."""
    cert_path, key_path = Path(cert), Path(key)
    certificate = _load_cert(cert_path)
    data = read_certs_file(key_path, "private key")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise CertificateError(
            f"{key_path}: private key is password-protected; gRPC needs it unencrypted"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{key_path}: not a PEM private key; {INIT_HINT}") from err
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):
        raise CertificateError(
            f"{key_path}: key does not match certificate {cert_path}; use the key that was "
            "generated with that certificate"
        )


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_cert(path: Path) -> x509.Certificate:
    data = read_certs_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(
            f"{path}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----'); check "
            "you passed the .crt file"
        ) from None


def is_ca_certificate(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    if not is_ca_certificate(cert):
        raise CertificateError(f"{path}: is not a CA certificate; pass the federation's ca.crt")


def _check_validity(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {INIT_HINT} and "
            "re-invite the clients"
        )
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check "
            "this machine's clock"
        )


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n.value) for n in ext if isinstance(n, x509.DNSName | x509.IPAddress))


def _host_matches(host: str, cert: x509.Certificate) -> bool:
    """Exact SAN match (case-insensitive DNS, parsed IPs); we never issue wildcard names."""
    value = host.strip().removeprefix("[").removesuffix("]")
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(value) in ext.get_values_for_type(x509.IPAddress)
    except ValueError:
        dns = value.lower().rstrip(".")
        return any(dns == n.lower().rstrip(".") for n in ext.get_values_for_type(x509.DNSName))


def _certificate_info(path: Path, now: datetime) -> CertificateInfo:
    cert = _load_cert(path)
    not_after = cert.not_valid_after_utc
    return CertificateInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=_sans(cert),
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        not_after=not_after,
        # timedelta.days floors, so a just-expired certificate already reads -1.
        expires_in_days=(not_after - now).days,
    )


def _ssh_fingerprint(path: Path) -> str:
    """`SHA256:<base64>`, the same string `ssh-keygen -lf` prints."""
    _, line = load_public_key(path)
    return fingerprint(line)
