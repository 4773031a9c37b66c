"""Tests for common.certificates: what we issue must load in Flower and pass real TLS."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import (
    public_key_to_bytes,
    sign_message,
    uses_nist_ec_curve,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.certificates.checking import (
    describe,
    verify_key_matches_certificate,
    verify_server_certificate,
)
from common.certificates.issuing import init_certs
from common.certificates.layout import CertsLayout
from common.certificates.manifest import add_client, client_public_keys
from common.site_keys import CertificateError

HOSTS = ["coordinator.example.org", "localhost", "127.0.0.1", "::1"]
CLIENTS = ["hospital-a", "bank-b"]
TIMEOUT_S = 5


@pytest.fixture
def layout(tmp_path: Path) -> CertsLayout:
    return init_certs(tmp_path / "certs", HOSTS, CLIENTS)


@pytest.fixture
def other_layout(tmp_path: Path) -> CertsLayout:
    return init_certs(tmp_path / "other", HOSTS, [])


def _server_cert(layout: CertsLayout) -> x509.Certificate:
    return x509.load_pem_x509_certificate(layout.server_cert.read_bytes())


def _reissue_server_cert(layout: CertsLayout, not_before: datetime, not_after: datetime) -> None:
    """Re-sign the coordinator cert with a chosen validity window (e.g. already expired)."""
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    old = _server_cert(layout)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca_cert.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    cert = builder.sign(ca_key, hashes.SHA384())
    layout.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# ------------------------------------------------------------------------------------ issuing


def test_server_cert_sans_contain_given_dns_names_and_ips(layout: CertsLayout) -> None:
    san = _server_cert(layout).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_server_cert_is_for_tls_servers_only(layout: CertsLayout) -> None:
    ext = _server_cert(layout).extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_ca_cert_is_a_self_signed_ca(layout: CertsLayout) -> None:
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    ca.verify_directly_issued_by(ca)


def test_chain_passes_strict_x509_path_validation(layout: CertsLayout) -> None:
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    store = verification.Store([ca])
    for host in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(host)
        chain = verifier.verify(_server_cert(layout), [])
        assert chain[-1] == ca


def test_private_keys_are_owner_read_write_only(layout: CertsLayout) -> None:
    secrets = [layout.ca_key, layout.server_key, *map(layout.client_private_key, CLIENTS)]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_init_writes_no_temp_files(layout: CertsLayout) -> None:
    leftovers = [p for p in layout.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_server_key_matches_server_cert(layout: CertsLayout) -> None:
    verify_key_matches_certificate(layout.server_cert, layout.server_key)


def test_foreign_key_does_not_match_server_cert(
    layout: CertsLayout, other_layout: CertsLayout
) -> None:
    with pytest.raises(CertificateError, match="does not match"):
        verify_key_matches_certificate(layout.server_cert, other_layout.server_key)


# ------------------------------------------------------------------------- client keys in Flower


def test_client_private_key_loads_with_flower_supernode_loader(layout: CertsLayout) -> None:
    args = argparse.Namespace(
        auth_supernode_private_key=str(layout.client_private_key("hospital-a")),
        auth_supernode_public_key=None,
    )
    keys = _try_setup_client_authentication(args)
    assert keys is not None
    private_key, public_key = keys
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(private_key.curve, ec.SECP384R1)
    assert uses_nist_ec_curve(public_key)


def test_client_public_key_loads_with_flwr_supernode_register_loader(layout: CertsLayout) -> None:
    pem = try_load_public_key(layout.client_public_key("bank-b"))
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_client_key_pair_matches_for_flower_signatures(layout: CertsLayout) -> None:
    private_key = serialization.load_ssh_private_key(
        layout.client_private_key("hospital-a").read_bytes(), password=None
    )
    registered = try_load_public_key(layout.client_public_key("hospital-a"))
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert public_key_to_bytes(private_key.public_key()) == registered
    public_key = serialization.load_ssh_public_key(
        layout.client_public_key("hospital-a").read_bytes()
    )
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    signature = sign_message(private_key, b"2024-01-01T00:00:00")
    assert verify_signature(public_key, b"2024-01-01T00:00:00", signature)
    other = serialization.load_ssh_public_key(layout.client_public_key("bank-b").read_bytes())
    assert isinstance(other, ec.EllipticCurvePublicKey)
    assert not verify_signature(other, b"2024-01-01T00:00:00", signature)


def test_client_public_keys_lists_invited_clients(layout: CertsLayout) -> None:
    assert client_public_keys(layout.root) == {
        name: layout.client_public_key(name) for name in CLIENTS
    }


def test_manifest_names_invited_clients(layout: CertsLayout) -> None:
    doc = json.loads(layout.manifest.read_text())
    assert [entry["name"] for entry in doc["clients"]] == CLIENTS


# ------------------------------------------------------------------------------- verification


def test_server_cert_verifies_against_its_own_ca(layout: CertsLayout) -> None:
    for host in HOSTS:
        verify_server_certificate(layout.ca_cert, layout.server_cert, host)


def test_server_cert_fails_against_another_ca(
    layout: CertsLayout, other_layout: CertsLayout
) -> None:
    with pytest.raises(CertificateError, match="not signed by the CA"):
        verify_server_certificate(other_layout.ca_cert, layout.server_cert, "localhost")


def test_host_not_in_sans_is_rejected(layout: CertsLayout) -> None:
    with pytest.raises(CertificateError, match="not in its SANs"):
        verify_server_certificate(layout.ca_cert, layout.server_cert, "evil.example.org")


def test_ip_not_in_sans_is_rejected(layout: CertsLayout) -> None:
    with pytest.raises(CertificateError, match="not in its SANs"):
        verify_server_certificate(layout.ca_cert, layout.server_cert, "10.0.0.1")


def test_missing_certificate_error_names_the_file(tmp_path: Path, layout: CertsLayout) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(CertificateError, match=r"nope\.crt: certificate not found"):
        verify_server_certificate(layout.ca_cert, missing, "localhost")


def test_non_pem_certificate_is_rejected(tmp_path: Path, layout: CertsLayout) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        verify_server_certificate(layout.ca_cert, garbage, "localhost")


def test_expired_server_cert_fails_verification(layout: CertsLayout) -> None:
    now = datetime.now(UTC)
    _reissue_server_cert(layout, now - timedelta(days=30), now - timedelta(days=2))
    with pytest.raises(CertificateError, match="expired"):
        verify_server_certificate(layout.ca_cert, layout.server_cert, "localhost")


def test_describe_reports_negative_expiry_for_expired_cert(layout: CertsLayout) -> None:
    now = datetime.now(UTC)
    _reissue_server_cert(layout, now - timedelta(days=30), now - timedelta(days=2))
    certs, _ = describe(layout.root)
    server = next(c for c in certs if c.path == layout.server_cert)
    assert server.expires_in_days < 0


def test_describe_reports_low_expiry_for_short_lived_certs(tmp_path: Path) -> None:
    root = init_certs(tmp_path / "short", ["localhost"], [], valid_days=7).root
    certs, _ = describe(root)
    assert [c.expires_in_days for c in certs] == [6, 6]


def test_describe_summarises_certs_and_client_keys(layout: CertsLayout) -> None:
    certs, keys = describe(layout.root)
    ca, server = certs
    assert ca.subject == ca.issuer == server.issuer
    assert ca.sans == ()
    assert server.sans == ("coordinator.example.org", "localhost", "127.0.0.1", "::1")
    assert 363 <= server.expires_in_days <= 365
    expected = _server_cert(layout).fingerprint(hashes.SHA256()).hex(":").upper()
    assert server.sha256_fingerprint == expected
    assert [k.name for k in keys] == CLIENTS
    assert all(k.sha256_fingerprint.startswith("SHA256:") for k in keys)
    assert len({k.sha256_fingerprint for k in keys}) == len(CLIENTS)


# ----------------------------------------------------------------------------------- inviting


def test_add_client_invites_one_more(layout: CertsLayout) -> None:
    private_path, public_path = add_client(layout.root, "clinic-c")
    assert private_path == layout.client_private_key("clinic-c")
    assert public_path == layout.client_public_key("clinic-c")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert list(client_public_keys(layout.root)) == [*CLIENTS, "clinic-c"]
    try_load_public_key(public_path)


def test_add_client_refuses_existing_name(layout: CertsLayout) -> None:
    before = layout.client_private_key("bank-b").read_bytes()
    with pytest.raises(CertificateError, match="already invited"):
        add_client(layout.root, "bank-b")
    assert layout.client_private_key("bank-b").read_bytes() == before


def test_add_client_refuses_uninitialised_directory(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not an initialised"):
        add_client(tmp_path, "clinic-c")


# ----------------------------------------------------------------------------------- refusing


def test_reinit_over_existing_ca_is_refused(layout: CertsLayout) -> None:
    before = layout.ca_key.read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        init_certs(layout.root, ["localhost"], ["new-client"])
    assert layout.ca_key.read_bytes() == before
    assert not layout.client_private_key("new-client").exists()


@pytest.mark.parametrize(
    "name", ["Hospital", "bank_b", "", "-flag", "../escape", "a b", "x" * 64, "ünï"]
)
def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateError, match=r"client\) name"):
        init_certs(tmp_path / "certs", ["localhost"], [name])
    assert not (tmp_path / "certs").exists()


def test_duplicate_client_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="unique"):
        init_certs(tmp_path / "certs", ["localhost"], ["bank-b", "bank-b"])


@pytest.mark.parametrize("host", ["", "bad host", "under_score.org", "-x.org", "*.example.org"])
def test_bad_hosts_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(CertificateError, match="host"):
        init_certs(tmp_path / "certs", [host], [])


def test_no_hosts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="no hosts"):
        init_certs(tmp_path / "certs", [], [])


# ------------------------------------------------------------------------ real TLS handshake


@contextlib.contextmanager
def _serve(layout: CertsLayout) -> Iterator[int]:
    """A gRPC health server on 127.0.0.1 serving with the coordinator cert; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(layout.server_key.read_bytes(), layout.server_cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(TIMEOUT_S)


@pytest.fixture
def tls_server(layout: CertsLayout) -> Iterator[int]:
    with _serve(layout) as port:
        yield port


def _health_check(port: int, ca_cert: Path) -> health_pb2.HealthCheckResponse:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)


def test_tls_handshake_succeeds_for_client_trusting_our_ca(
    layout: CertsLayout, tls_server: int
) -> None:
    response = _health_check(tls_server, layout.ca_cert)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_handshake_fails_for_client_trusting_another_ca(
    other_layout: CertsLayout, tls_server: int
) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _health_check(tls_server, other_layout.ca_cert)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in (excinfo.value.details() or "")


def test_tls_handshake_fails_when_dialed_ip_is_not_in_sans(tmp_path: Path) -> None:
    dns_only = init_certs(tmp_path / "dns-only", ["localhost"], [])
    with _serve(dns_only) as port, pytest.raises(grpc.RpcError) as excinfo:
        _health_check(port, dns_only.ca_cert)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
