"""Issue a federation's CA and coordinator certificate (`confide certs init`).

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
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic_file import write_atomically
from common.certificates.layout import CertsLayout
from common.certificates.manifest import manifest_entry, write_manifest
from common.site_keys import CertificateError, check_site_name, key_pair_bytes, write_new_key

# Flower generates SECP384R1 keys (flwr/supercore/primitives/asymmetric.py, generate_key_pairs).
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
# Machines in a federation rarely share a clock exactly; back-date so a fresh cert is not "not yet
# valid" on a client a few minutes behind.
_CLOCK_SKEW = timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


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
        write_new_key(layout.client_private_key(name), private_pem, 0o600)
        write_new_key(layout.client_public_key(name), public_line, 0o644)
    write_new_key(layout.server_key, _pkcs8(server_key), 0o600)
    write_atomically(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    ca_key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_new_key(ca_key_path, _pkcs8(ca_key), 0o600)
    write_atomically(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    # Written last: its presence means "initialisation finished".
    write_manifest(layout, [manifest_entry(layout, name, now) for name in names])
    return layout


def _check_client_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise CertificateError(f"clients must be a list of names, got the string {names!r}")
    checked = [check_site_name(n) for n in names]
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
