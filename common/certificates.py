"""Certificates and keys for a Confide federation: one CA, one coordinator, many invited clients.

The coordinator (Flower SuperLink) serves gRPC over TLS with a certificate signed by our own CA, and
each client (Flower SuperNode) proves who it is with its own EC key pair (Flower's SuperNode
authentication). `init_certs` creates everything in one directory:

    ca.crt               CA certificate. PUBLIC: give it to everyone (clients trust the coordinator
                         through it).
    ca.key               CA private key. SECRET: whoever holds it can impersonate the coordinator.
                         Keep it with the federation operator only, ideally offline after setup.
    server.crt           Coordinator certificate (SANs = the hosts clients dial). Public.
    server.key           Coordinator TLS private key. SECRET: only the coordinator machine.
    clients/NAME.key     Client private key, OpenSSH PEM. SECRET: only that client, never the
                         coordinator or other clients
                         (`flower-supernode --auth-supernode-private-key clients/NAME.key`).
    clients/NAME.pub     Client public key, OpenSSH one-line. Public: the coordinator needs it
                         (`flwr supernode register NAME.pub`) to admit that client.
    clients.json         Manifest of invited clients, so later code knows who was invited. Public.

Key formats follow what flwr 1.42 loads: the SuperNode reads its key with cryptography's
`load_ssh_private_key(data, None)` and requires an EC key
(flwr/supernode/cli/flower_supernode.py, `_try_setup_client_authentication`); `flwr supernode
register` reads the public key with `load_ssh_public_key` and requires an EC key on a NIST curve
(flwr/cli/supernode/register.py, `try_load_public_key`). Flower itself generates SECP384R1 keys,
so we do too. TLS keys are unencrypted PKCS#8 PEM, which is what gRPC's `ssl_server_credentials`
takes (flwr/supercore/grpc.py).

Secret files are created 0600 from the first byte (temp file + rename), so a crash never leaves a
readable or half-written key behind.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.file_reading import read_named_file
from common.site_keys import (
    CertificateError,
    check_site_name,
    fingerprint,
    key_pair_bytes,
    load_public_key,
    write_atomic,
)

__all__ = [
    "CertificateError",
    "CertificateInfo",
    "CertsLayout",
    "ClientKeyInfo",
    "add_client",
    "client_public_keys",
    "describe",
    "init_certs",
    "invite_client",
    "revoke_client",
    "revoked_clients",
    "verify_key_matches_certificate",
    "verify_server_certificate",
]

# Flower generates SECP384R1 keys (flwr/supercore/primitives/asymmetric.py, generate_key_pairs).
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
# Machines in a federation rarely share a clock exactly; back-date so a fresh cert is not "not yet
# valid" on a client a few minutes behind.
_CLOCK_SKEW = timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_MANIFEST_FORMAT = 1
_INIT_HINT = "create a fresh directory with `confide certs init`"


@dataclass(frozen=True)
class CertsLayout:
    """Where each file lives, so the CLI, coordinator and clients agree on names."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    @property
    def manifest(self) -> Path:
        return self.root / "clients.json"

    def client_private_key(self, name: str) -> Path:
        return self.clients_dir / f"{_check_client_name(name)}.key"

    def client_public_key(self, name: str) -> Path:
        return self.clients_dir / f"{_check_client_name(name)}.pub"


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


# ------------------------------------------------------------------------------------ public API


def init_certs(
    out: Path,
    hosts: Sequence[str],
    clients: Sequence[str] = (),
    valid_days: int = 365,
    ca_key_out: Path | None = None,
) -> CertsLayout:
    """Create the CA, coordinator certificate and, for a rehearsal on one machine only, one key
    pair per client in `out` (real sites make their own: `site_keys.generate_site_key`).

    `ca_key_out`: where the CA key goes instead of `out/ca.key`, so the directory copied to the
    coordinator never held it. Everything is validated and generated in memory before the first
    write, so bad input leaves `out` untouched. An existing CA is never overwritten: replacing it
    would silently lock out every client that already trusts the old one.
    """
    layout = CertsLayout(Path(out))
    ca_key_path = Path(ca_key_out) if ca_key_out is not None else layout.ca_key
    names = _check_client_names(clients)
    sans = _parse_hosts(hosts)
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise CertificateError(f"valid_days must be a whole number >= 1, got {valid_days!r}")
    if layout.root.exists() and not layout.root.is_dir():
        raise CertificateError(f"{layout.root}: exists and is not a directory; choose another path")
    if ca_key_path.parent.exists() and not ca_key_path.parent.is_dir():
        raise CertificateError(f"{ca_key_path}: its folder is not a directory; pass another path")
    ours = [layout.ca_cert, ca_key_path, layout.server_cert, layout.server_key, layout.manifest]
    ours += [
        f(name) for name in names for f in (layout.client_private_key, layout.client_public_key)
    ]
    existing = [p for p in ours if p.exists()]
    if existing:
        found = existing[0]
        raise CertificateError(
            f"{found}: already exists, refusing to overwrite a federation's CA or keys; use "
            "`add_client` to invite more clients, or pick an empty directory (a new CA means "
            "every client must be re-invited)"
        )

    now = datetime.now(UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + timedelta(days=valid_days)
    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = _build_ca_cert(ca_key, not_before, not_after)
    server_key = ec.generate_private_key(_CURVE())
    server_cert = _build_server_cert(ca_key, ca_cert, server_key, sans, not_before, not_after)
    client_files = {name: key_pair_bytes(name) for name in names}

    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout.clients_dir.mkdir(mode=0o700, exist_ok=True)
    for name, (private_pem, public_line) in client_files.items():
        write_atomic(layout.client_private_key(name), private_pem, 0o600, exclusive=True)
        write_atomic(layout.client_public_key(name), public_line, 0o644, exclusive=True)
    write_atomic(layout.server_key, _pkcs8(server_key), 0o600, exclusive=True)
    write_atomic(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    ca_key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(ca_key_path, _pkcs8(ca_key), 0o600, exclusive=True)
    write_atomic(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # Written last: its presence means "initialisation finished".
    _write_manifest(layout, [_manifest_entry(layout, name, now) for name in names])
    return layout


def add_client(root: Path, name: str) -> tuple[Path, Path]:
    """Rehearsal on one machine only: make a key pair for one more client here and invite it;
    returns (private key, public key). Real sites make their own (`invite_client`).

    Not safe against two concurrent `add_client` calls on the same directory (the manifest is
    read-modify-write); key files themselves are never overwritten.
    """
    layout = CertsLayout(Path(root))
    _check_client_name(name)
    entries = _read_manifest(layout)
    _check_new_name(layout, entries, name)
    private_path, public_path = layout.client_private_key(name), layout.client_public_key(name)
    private_pem, public_line = key_pair_bytes(name)
    layout.clients_dir.mkdir(mode=0o700, exist_ok=True)
    write_atomic(private_path, private_pem, 0o600, exclusive=True)
    write_atomic(public_path, public_line, 0o644, exclusive=True)
    _write_manifest(layout, [*entries, _manifest_entry(layout, name, datetime.now(UTC))])
    return private_path, public_path


def invite_client(root: Path, name: str, public_key_file: Path) -> tuple[Path, str]:
    """Invite a site by the public key it made itself; returns (stored key, fingerprint).

    The operator never holds the site's private key. Everything is checked before the first
    write; the key is copied to clients/NAME.pub, then the manifest is replaced atomically.
    """
    layout = CertsLayout(Path(root))
    _check_client_name(name)
    entries = _read_manifest(layout)
    _check_new_name(layout, entries, name)
    _, line = load_public_key(Path(public_key_file))
    print_ = fingerprint(line)
    for entry in entries:
        other = layout.client_public_key(entry["name"])
        if other.is_file() and fingerprint(load_public_key(other)[1]) == print_:
            raise CertificateError(
                f"{public_key_file}: this key is already {entry['name']!r}'s"
                f"{' (revoked)' if entry.get('revoked') else ''}; ask the site for its own key, "
                "made with `confide certs keygen`"
            )
    public_path = layout.client_public_key(name)
    layout.clients_dir.mkdir(mode=0o700, exist_ok=True)
    write_atomic(public_path, line.rstrip(b"\n") + f" confide-{name}\n".encode(), 0o644,
                 exclusive=True)  # fmt: skip
    try:
        _write_manifest(layout, [*entries, _manifest_entry(layout, name, datetime.now(UTC))])
    except BaseException:
        public_path.unlink(missing_ok=True)
        raise
    return public_path, print_


def revoke_client(root: Path, name: str) -> datetime:
    """Withdraw a site's invitation: the manifest marks it revoked (its public key stays, so the
    coordinator can find and unregister its node, and a site can be told it was revoked)."""
    layout = CertsLayout(Path(root))
    entries = _read_manifest(layout)
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
        invited = ", ".join(e["name"] for e in entries if not e.get("revoked")) or "none"
        raise CertificateError(
            f"{layout.manifest}: no site named {name!r} is invited (invited: {invited}); check "
            "the name with `confide certs show`"
        )
    if entry.get("revoked"):
        raise CertificateError(
            f"{layout.manifest}: {name!r} was already revoked on {entry['revoked']}; nothing to do"
        )
    now = datetime.now(UTC)
    revoked = {**entry, "revoked": now.isoformat(timespec="seconds")}
    _write_manifest(layout, [revoked if e is entry else e for e in entries])
    return now


def revoked_clients(root: Path) -> dict[str, Path]:
    """Revoked site name -> its (former) public key file, where it still exists."""
    layout = CertsLayout(Path(root))
    return {
        entry["name"]: layout.client_public_key(entry["name"])
        for entry in _read_manifest(layout)
        if entry.get("revoked") and layout.client_public_key(entry["name"]).is_file()
    }


def _check_new_name(layout: CertsLayout, entries: list[dict[str, str]], name: str) -> None:
    existing = next((e for e in entries if e["name"] == name), None)
    if existing is not None:
        state = f"was revoked on {existing['revoked']}" if existing.get("revoked") else (
            "is already invited")  # fmt: skip
        raise CertificateError(
            f"{layout.manifest}: site {name!r} {state}; invite this key under another name"
        )
    for path in (layout.client_private_key(name), layout.client_public_key(name)):
        if path.exists():
            raise CertificateError(
                f"{path}: leftover key file for uninvited site {name!r}; delete it or pick "
                "another name"
            )


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
            f"{_INIT_HINT} --host {host}"
        )


def verify_key_matches_certificate(cert: Path, key: Path) -> None:
    """Catch a swapped/stale key file before the TLS server starts and fails every handshake."""
    cert_path, key_path = Path(cert), Path(key)
    certificate = _load_cert(cert_path)
    data = _read(key_path, "private key")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise CertificateError(
            f"{key_path}: private key is password-protected; gRPC needs it unencrypted"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{key_path}: not a PEM private key; {_INIT_HINT}") from err
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):
        raise CertificateError(
            f"{key_path}: key does not match certificate {cert_path}; use the key that was "
            "generated with that certificate"
        )


def client_public_keys(root: Path) -> dict[str, Path]:
    """Invited (not revoked) client name -> OpenSSH public key file, in invitation order."""
    layout = CertsLayout(Path(root))
    keys: dict[str, Path] = {}
    for entry in _read_manifest(layout):
        if entry.get("revoked"):
            continue
        path = layout.client_public_key(entry["name"])
        if not path.is_file():
            raise CertificateError(
                f"{path}: public key of invited client {entry['name']!r} is missing; restore it "
                "from a backup or re-invite the client under a new name"
            )
        keys[entry["name"]] = path
    return keys


# ------------------------------------------------------------------------------ building blocks


def _check_client_name(name: str) -> str:
    return check_site_name(name)


def _check_client_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise CertificateError(f"clients must be a list of names, got the string {names!r}")
    checked = [_check_client_name(n) for n in names]
    duplicates = sorted({n for n in checked if checked.count(n) > 1})
    if duplicates:
        raise CertificateError(f"client names must be unique; repeated: {', '.join(duplicates)}")
    return checked


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        hosts = [hosts]
    sans: list[x509.GeneralName] = []
    for raw in hosts:
        host = str(raw).strip().removeprefix("[").removesuffix("]")
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            dns = host.lower().rstrip(".")
            labels = dns.split(".")
            if not dns or len(dns) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
                raise CertificateError(
                    f"host {raw!r} is neither an IP address nor a DNS name (ASCII letters, "
                    "digits, '-' and '.'); pass the name or address clients will dial"
                ) from None
            san = x509.DNSName(dns)
        if san not in sans:
            sans.append(san)
    if not sans:
        raise CertificateError("no hosts given; pass the DNS name(s)/IP(s) clients will dial")
    return sans


def _build_ca_cert(
    key: ec.EllipticCurvePrivateKey, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    # A random suffix tells two federations' CAs apart in `certs show` and in TLS error messages.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Confide CA {secrets.token_hex(4)}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _SIGNATURE_HASH())
    )


def _build_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    # TLS clients match the SANs only; the CN is a label for humans.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Confide coordinator"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _SIGNATURE_HASH())
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # gRPC cannot take a passphrase
    )


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------------- reading & checking


def _read(path: Path, what: str) -> bytes:
    return read_named_file(path, what, f"check the path or {_INIT_HINT}", CertificateError)


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(
            f"{path}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----'); check "
            "you passed the .crt file"
        ) from None


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{path}: is not a CA certificate; pass the federation's ca.crt")


def _check_validity(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {_INIT_HINT} and "
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


# ------------------------------------------------------------------------------------- manifest


def _manifest_entry(layout: CertsLayout, name: str, added: datetime) -> dict[str, str]:
    return {
        "name": name,
        "public_key": layout.client_public_key(name).relative_to(layout.root).as_posix(),
        "added": added.isoformat(timespec="seconds"),
    }


def _write_manifest(layout: CertsLayout, entries: list[dict[str, str]]) -> None:
    doc = {"format": _MANIFEST_FORMAT, "clients": entries}
    write_atomic(layout.manifest, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)


def _read_manifest(layout: CertsLayout) -> list[dict[str, str]]:
    if not layout.manifest.is_file():
        raise CertificateError(
            f"{layout.manifest}: not found, so {layout.root} is not an initialised certificates "
            f"directory; pass the right directory or {_INIT_HINT}"
        )
    data = _read(layout.manifest, "client manifest")
    try:
        doc = json.loads(data)
        entries = doc["clients"]
        if doc.get("format") != _MANIFEST_FORMAT or not isinstance(entries, list):
            raise ValueError
        for entry in entries:
            _check_client_name(entry["name"])
    except (ValueError, KeyError, TypeError, CertificateError):
        raise CertificateError(
            f"{layout.manifest}: corrupt client manifest; restore it from a backup"
        ) from None
    return entries
