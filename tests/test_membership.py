"""Membership as an IT department runs it: keys born at the site, invitations by public key,
revocations that take effect, an operator-only Control API, a coordinator stop that signals only
its own process. Fast: no federation (the real-process checks are in tests/test_deployment.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from client.join import describe_refusal
from common.certificates.issuing import init_certs
from common.certificates.layout import CertsLayout
from common.certificates.manifest import (
    client_public_keys,
    invite_client,
    revoke_client,
    revoked_clients,
)
from common.site_keys import (
    CertificateError,
    flower_public_key_bytes,
    generate_site_key,
    load_public_key,
)
from confide.cli import app
from server.coordinator import coordinator as coordinator_module
from server.coordinator.coordinator import (
    CoordinatorError,
    StateLayout,
    process_start_ticks,
    stop_coordinator,
    sync_invitations,
)
from server.coordinator.operator_credential import HEADER, OperatorOnly

# ------------------------------------------------------------------------------ keys at the site


def test_keygen_makes_a_private_key_only_its_owner_reads_and_a_public_key_flower_accepts(
    tmp_path: Path,
) -> None:
    pair = generate_site_key(tmp_path / "keys", "bank-1")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(pair.public_key) == flower_public_key_bytes(private.public_key())
    blob = pair.public_key.read_bytes().split()[1]
    import base64

    expected = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode()
    assert pair.fingerprint == "SHA256:" + expected.rstrip("=")  # what ssh-keygen -lf prints


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    pair = generate_site_key(tmp_path, "bank-1")
    before = pair.private_key.read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        generate_site_key(tmp_path, "bank-1")
    assert pair.private_key.read_bytes() == before


def test_keygen_command_prints_the_public_key_and_its_fingerprint(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["certs", "keygen", "--out", str(tmp_path), "--name", "b-1"])
    assert result.exit_code == 0, result.output
    assert "ecdsa-sha2-nistp384 " in result.stdout and "fingerprint: SHA256:" in result.stdout


def test_init_can_keep_the_ca_key_out_of_the_coordinators_directory(tmp_path: Path) -> None:
    layout = init_certs(tmp_path / "certs", ["127.0.0.1"], ca_key_out=tmp_path / "usb" / "ca.key")
    assert not layout.ca_key.exists()
    assert stat.S_IMODE((tmp_path / "usb" / "ca.key").stat().st_mode) == 0o600
    assert coordinator_module.ca_key_warning(layout.root) is None
    careless = init_certs(tmp_path / "careless", ["127.0.0.1"])
    assert str(careless.ca_key.resolve()) in str(coordinator_module.ca_key_warning(careless.root))


def test_init_says_what_goes_to_the_coordinator_and_labels_rehearsal_keys(tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "a"), "--host", "x"])
    assert plain.exit_code == 0, plain.output
    assert "clients.json and clients/*.pub" in " ".join(plain.stdout.split())
    rehearsal = runner.invoke(
        app, ["certs", "init", "--out", str(tmp_path / "b"), "--host", "x", "--clients", "h-1"]
    )
    assert rehearsal.exit_code == 0 and "rehearsal keys" in rehearsal.stderr


# ------------------------------------------------------------------------------ invitations


@pytest.fixture
def federation_dir(tmp_path: Path) -> CertsLayout:
    return init_certs(tmp_path / "certs", ["127.0.0.1"])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_site_is_invited_by_its_public_key_and_revoked(
    federation_dir: CertsLayout, tmp_path: Path
) -> None:
    pair = generate_site_key(tmp_path / "site", "bank-1")
    stored, fingerprint = invite_client(federation_dir.root, "bank-1", pair.public_key)
    assert (
        fingerprint == pair.fingerprint and not federation_dir.client_private_key("bank-1").exists()
    )
    assert load_public_key(stored)[1] == load_public_key(pair.public_key)[1]
    assert list(client_public_keys(federation_dir.root)) == ["bank-1"]
    revoke_client(federation_dir.root, "bank-1")
    assert client_public_keys(federation_dir.root) == {}
    assert list(revoked_clients(federation_dir.root)) == ["bank-1"]


def _foreign_keys(tmp_path: Path) -> dict[str, Path]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ed_key = ed25519.Ed25519PrivateKey.generate().public_key()
    ssh = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    site = generate_site_key(tmp_path / "site", "bank-1")
    files = {
        "rsa.pub": rsa_key.public_bytes(*ssh),
        "ed25519.pub": ed_key.public_bytes(*ssh),
        "private.key": site.private_key.read_bytes(),
        "garbage.pub": b"not a key at all\n",
        "empty.pub": b"",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["missing.pub"] = tmp_path / "missing.pub"
    return paths


def test_a_key_that_is_not_an_openssh_ec_key_is_refused_naming_the_file(
    federation_dir: CertsLayout, tmp_path: Path
) -> None:
    before = _snapshot(federation_dir.root)
    for name, path in _foreign_keys(tmp_path).items():
        with pytest.raises(CertificateError) as caught:
            invite_client(federation_dir.root, "bank-2", path)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message, name
        assert "keygen" in message or "check" in message, (name, message)
        assert _snapshot(federation_dir.root) == before, name


def test_a_duplicate_name_a_reused_key_and_an_unknown_revoke_change_nothing(
    federation_dir: CertsLayout, tmp_path: Path
) -> None:
    first = generate_site_key(tmp_path / "one", "bank-1")
    invite_client(federation_dir.root, "bank-1", first.public_key)
    second = generate_site_key(tmp_path / "two", "bank-2")
    before = _snapshot(federation_dir.root)
    cases = {
        "already invited": lambda: invite_client(federation_dir.root, "bank-1", second.public_key),
        "already 'bank-1'": lambda: invite_client(federation_dir.root, "bank-9", first.public_key),
        "no site named 'bank-7'": lambda: revoke_client(federation_dir.root, "bank-7"),
    }
    for expected, attempt in cases.items():
        with pytest.raises(CertificateError, match=expected):
            attempt()
        assert _snapshot(federation_dir.root) == before, expected
    revoke_client(federation_dir.root, "bank-1")
    with pytest.raises(CertificateError, match="already revoked"):
        revoke_client(federation_dir.root, "bank-1")
    with pytest.raises(CertificateError, match="was revoked"):
        invite_client(federation_dir.root, "bank-1", second.public_key)


def test_bad_input_on_the_command_line_is_one_line(
    federation_dir: CertsLayout, tmp_path: Path
) -> None:
    runner = CliRunner()
    key = _foreign_keys(tmp_path)["rsa.pub"]
    for args in (
        ["certs", "add-client", str(federation_dir.root), "b-1", "--public-key", str(key)],
        ["certs", "revoke", str(federation_dir.root), "nobody"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) <= 2 and lines[0].startswith("error: "), result.stderr  # rich wraps


# ------------------------------------------------------------------------------ the coordinator


class FakeControl:
    """Records what the coordinator asks Flower's Control API to do."""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.unregistered: list[int] = []


def _node_table(path: Path, rows: list[tuple[int, str, str, bytes]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE node (node_id INTEGER, name TEXT, status TEXT, online_until REAL, "
            "public_key BLOB)"
        )
        db.executemany(
            "INSERT INTO node VALUES (?, ?, ?, ?, ?)",
            [(nid, name, status, time.time() + 60, key) for nid, name, status, key in rows],
        )


def test_sync_registers_new_invitations_and_unregisters_every_key_no_longer_invited(
    federation_dir: CertsLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {n: generate_site_key(tmp_path / n, n) for n in ("bank-1", "bank-2", "bank-3")}
    for name in ("bank-1", "bank-2", "bank-3"):
        invite_client(federation_dir.root, name, keys[name].public_key)
    revoke_client(federation_dir.root, "bank-2")
    stranger = generate_site_key(tmp_path / "x", "stranger")
    flower = {n: flower_public_key_bytes(load_public_key(k.public_key)[0]) for n, k in keys.items()}
    state = StateLayout(tmp_path / "state")
    state.root.mkdir()
    _node_table(state.database, [
        (11, "bank-1", "online", flower["bank-1"]),
        (-12, "bank-2", "online", flower["bank-2"]),  # Flower stores uint64 ids as sint64
        (13, "stranger", "registered", flower_public_key_bytes(
            load_public_key(stranger.public_key)[0])),
        (14, "old", "unregistered", b"gone"),
    ])  # fmt: skip
    control = FakeControl()
    monkeypatch.setattr(coordinator_module.flwr_control, "register_node",
                        lambda _c, _path, name: control.registered.append(name) or 99)  # fmt: skip
    monkeypatch.setattr(coordinator_module.flwr_control, "unregister_node",
                        lambda _c, node_id: control.unregistered.append(node_id))  # fmt: skip
    record = sync_invitations(None, state, federation_dir.root)  # type: ignore[arg-type]
    assert control.registered == ["bank-3"]
    assert sorted(control.unregistered) == [13, 2**64 - 12]
    assert {name: entry["node_id"] for name, entry in record.items()} == {
        "bank-1": 11, "bank-3": 99,
    }  # fmt: skip
    status_map = state.site_status.read_text()
    assert status_map.count(" invited;") == 2 and status_map.count(" revoked;") == 1


def test_control_api_answers_only_the_operator() -> None:
    async def flower(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"runs"})

    guarded = OperatorOnly(flower, "s3cret")

    def call(path: str, headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "headers": headers}
        asyncio.run(guarded(scope, receive, send))
        return sent[0]["status"]

    credential = [(HEADER.encode(), b"s3cret")]
    assert call("/v1/control/list-runs", []) == 403
    assert call("/v1/control/list-runs", [(HEADER.encode(), b"guess")]) == 403
    assert call("/docs", []) == 403
    assert call("/v1/control/list-runs", credential) == 200
    assert call("/v1/fleet/pull-messages", []) == 200  # the Fleet API has its own node auth


def _fake_coordinator(argv_tail: list[str]) -> subprocess.Popen:
    """A process whose command line looks like `confide coordinator start ...` (or not)."""
    code = "import time; time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code, *argv_tail], start_new_session=True)


def _status_for(state: Path, process: subprocess.Popen) -> None:
    import json

    for _ in range(50):  # the kernel needs a moment to show the new command line
        if process_start_ticks(process.pid) is not None:
            break
        time.sleep(0.05)
    state.mkdir(exist_ok=True)
    StateLayout(state).status_file.write_text(json.dumps({
        "pid": process.pid, "status": "ready", "start_ticks": process_start_ticks(process.pid),
    }))  # fmt: skip


def test_stop_signals_only_a_process_proven_to_be_this_coordinator(tmp_path: Path) -> None:
    state = tmp_path / "state"
    impostor = _fake_coordinator(["something", "else"])
    try:
        _status_for(state, impostor)
        with pytest.raises(CoordinatorError, match="nothing was signalled"):
            stop_coordinator(state)
        assert impostor.poll() is None  # still running, untouched
    finally:
        impostor.kill()
        impostor.wait()
    ours = _fake_coordinator(["coordinator", "start", "--state", str(state)])
    try:
        _status_for(state, ours)
        assert stop_coordinator(state, timeout=20) == ours.pid
        assert ours.wait(timeout=10) != 0
    finally:
        if ours.poll() is None:
            ours.kill()
            ours.wait()


def test_a_recycled_pid_is_not_taken_for_the_coordinator(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ours = _fake_coordinator(["coordinator", "start", "--state", str(state)])
    try:
        _status_for(state, ours)
        layout = StateLayout(state)
        status = layout.status_file.read_text().replace('"start_ticks": ', '"start_ticks": 1')
        layout.status_file.write_text(status)
        with pytest.raises(CoordinatorError, match="nothing was signalled"):
            stop_coordinator(state)
        assert ours.poll() is None
    finally:
        ours.kill()
        ours.wait()


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("code", "body", "clock_offset", "case"),
    [
        (404, "", 0, "not invited:"),
        (200, "revoked", 0, "revoked:"),
        (200, "invited", 0, "already online:"),
        (200, "invited", -30, "clock skew:"),  # this site runs 30 s ahead
        (404, "", 600, "clock skew:"),  # ten minutes behind
    ],
)
def test_a_refused_site_is_told_which_case_it_is(code, body, clock_offset, case) -> None:
    server_date = datetime.now(UTC) + timedelta(seconds=clock_offset)
    message = describe_refusal(code, body, server_date, Path("bank-1.key"), "SHA256:x")
    assert message.startswith(case), message
    assert "\n" not in message


def test_environment_has_no_stray_credential() -> None:
    # The SuperLink reads its credential file from this variable; it must come from the
    # coordinator, never from whoever runs the tests.
    assert "CONFIDE_OPERATOR_CREDENTIAL" not in os.environ


def test_the_front_door_limits_bodies_and_serves_only_key_statuses(tmp_path: Path) -> None:
    from common.processes import find_executable
    from server.coordinator.control_proxy import ProxySettings, check_config, nginx_config
    from server.coordinator.coordinator import write_site_status
    from tests.deployment_fixtures import require_nginx

    require_nginx()
    certs = init_certs(tmp_path / "certs", ["127.0.0.1"])
    keys = [generate_site_key(tmp_path / n, n) for n in ("bank-1", "bank-2")]
    status_map = tmp_path / "proxy" / "site-status.map"
    lines = [load_public_key(k.public_key)[1] for k in keys]
    write_site_status(status_map, {"bank-1": lines[0]}, {"bank-2": lines[1]})
    settings = ProxySettings("127.0.0.1", 9, certs.server_cert, certs.server_key, 8, certs.ca_cert,
                             tmp_path / "proxy", max_request_mb=3, site_status=status_map)  # fmt: skip
    (settings.workdir / "tmp").mkdir(parents=True)
    text = nginx_config(settings)
    settings.config_path.write_text(text)
    check_config(find_executable("nginx", ""), settings)  # nginx -t, with the map included
    assert "client_max_body_size 3m;" in text
    assert "location ^~ /confide/site-status/ {" in text and "autoindex" not in text


def test_a_custom_schema_federation_is_one_option_of_coordinator_run(tmp_path: Path) -> None:
    from server.coordinator.coordinator_run import RunRequest, run_config_for

    schema = Path(__file__).resolve().parents[1] / "data" / "uci_bank_marketing" / "schema.toml"
    request = RunRequest(state=tmp_path, out=tmp_path / "run", schema=schema)
    config = run_config_for(request, expected_clients=2)
    assert (config.task, config.schema_file, config.num_clients) == ("custom", str(schema), 2)
    with pytest.raises(CoordinatorError, match=r"--schema .*no such file"):
        run_config_for(RunRequest(tmp_path, tmp_path / "run", schema=tmp_path / "x.toml"), 2)
