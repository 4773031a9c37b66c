"""Certificates and keys for a Confide federation: one CA, one coordinator, many invited clients.

The coordinator (Flower SuperLink) serves gRPC over TLS with a certificate signed by our own CA, and
each client (Flower SuperNode) proves who it is with its own EC key pair (Flower's SuperNode
authentication). `common.certificates.issuing.init_certs` creates everything in one directory,
whose layout this module names:

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.file_reading import read_named_file
from common.site_keys import CertificateError, check_site_name

INIT_HINT = "create a fresh directory with `confide certs init`"


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
        return self.clients_dir / f"{check_site_name(name)}.key"

    def client_public_key(self, name: str) -> Path:
        return self.clients_dir / f"{check_site_name(name)}.pub"


def read_certs_file(path: Path, what: str) -> bytes:
    """The bytes of one file of the directory, or one CertificateError line saying what to do."""
    return read_named_file(path, what, f"check the path or {INIT_HINT}", CertificateError)
