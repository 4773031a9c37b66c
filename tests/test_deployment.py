"""`confide certs / coordinator / join` as operators run them: real Flower processes on 127.0.0.1.

The slow tests share one federation (a TLS coordinator behind nginx, a hospital and a bank) for
the module; every process is stopped at the end and the last test asserts nothing is left. The
bad-input tests run the CLI in-process and must fail before anything starts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.certificates.issuing import init_certs
from common.flower_args import key_values
from common.processes import child_environment, find_executable, free_port, venv_bin
from confide.cli import app
from server.coordinator import flwr_control
from server.coordinator.control_proxy import (
    FLEET_ENDPOINTS,
    ProxySettings,
    check_config,
    nginx_config,
)
from server.coordinator.coordinator import StateLayout, online_sites
from server.coordinator.coordinator_run import connect
from tests.deployment_fixtures import (
    Background,
    Federation,
    confide,
    leftovers,
    reissue_expired,
    require_nginx,
    running_federation,
    wait_for,
    write_site,
)
from tests.port_fuzz import FLEET_PAYLOADS, HTTP_REQUESTS, TLS_RECORDS, fuzz_public_port

RUN_TIMEOUT = 900


# ----------------------------------------------------------------------------- fast, no network


def test_front_door_forwards_exactly_the_fleet_api_of_the_installed_flower():
    from flwr.superlink.routers.fleet.router import router

    assert sorted(route.path for route in router.routes) == sorted(
        f"/v1/fleet/{endpoint}" for endpoint in FLEET_ENDPOINTS
    )


def test_nginx_configuration_is_valid_and_closes_everything_but_fleet(tmp_path):
    require_nginx()
    certs = init_certs(tmp_path / "certs", ["127.0.0.1"], ["hospital-1"])
    settings = ProxySettings("127.0.0.1", 9, certs.server_cert, certs.server_key, 8, certs.ca_cert,
                             tmp_path / "proxy")  # fmt: skip
    (settings.workdir / "tmp").mkdir(parents=True)
    text = nginx_config(settings)
    settings.config_path.write_text(text)
    check_config(find_executable("nginx", ""), settings)
    assert text.count("location = /v1/fleet/") == len(FLEET_ENDPOINTS)
    assert "location / {\n            return 404;" in text
    assert "/v1/control" not in text and "/v1/runtime" not in text
    assert "listen 127.0.0.1:9 ssl;" in text and "proxy_ssl_verify on;" in text


@pytest.mark.parametrize(
    ("status", "message"),
    [("starting", "is still starting"), ("stopped", "no coordinator is running")],
)
def test_a_run_submitted_too_early_or_too_late_says_which(tmp_path, status, message):
    from server.coordinator.coordinator import CoordinatorError

    layout = StateLayout(tmp_path)
    layout.status_file.write_text(json.dumps({"status": status, "pid": os.getpid()}))
    with pytest.raises(CoordinatorError, match=message):
        connect(tmp_path)


def test_node_config_survives_flowers_parser():
    from flwr.common.config import parse_config_args

    values = {"data-path": "/data/my site/it's.csv", "name": "bank-1", "epochs": 2, "dp": True}
    assert parse_config_args([key_values(values)]) == values


def test_certs_commands_make_show_and_extend_a_federation(cli, tmp_path):
    out = tmp_path / "fed"
    made = cli.invoke(app, ["certs", "init", "--out", str(out), "--host", "coord.example.org,10.0.0.5",
                            "--host", "127.0.0.1", "--clients", "hospital-1,bank-1",
                            "--valid-days", "20"])  # fmt: skip
    assert made.exit_code == 0, made.output
    for key in ("ca.key", "server.key", "clients/hospital-1.key", "clients/bank-1.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    added = cli.invoke(app, ["certs", "add-client", str(out), "hospital-2"])
    assert added.exit_code == 0, added.output
    shown = cli.invoke(app, ["certs", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "coord.example.org, 10.0.0.5, 127.0.0.1" in shown.stdout
    assert shown.stdout.count("SHA256:") == 3 and "hospital-2" in shown.stdout
    assert "expires in 19 days" in shown.stderr  # the 30-day warning, for the CA and server.crt
    again = refused(cli, ["certs", "init", "--out", out, "--host", "x", "--clients", "a"], tmp_path)
    assert "already exists, refusing to overwrite" in again


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def cli(monkeypatch) -> Iterator[CliRunner]:
    """The CLI in-process; signal handlers it installs are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setenv("COLUMNS", "400")
    yield CliRunner()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def refused(cli: CliRunner, args: list[str], marker: Path) -> str:
    """Run a command that must fail cleanly; returns its single error line."""
    result = cli.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    assert not leftovers(str(marker)), leftovers(str(marker))
    return "\n".join(lines)


def _coordinator_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    certs = init_certs(tmp_path / "certs", ["127.0.0.1", "localhost"], ["hospital-1"])
    other = init_certs(tmp_path / "other", ["127.0.0.1"], ["x"])
    if case == "missing certs directory":
        return ["--certs", tmp_path / "nowhere"], "nowhere/clients.json: not found"
    if case == "missing key":
        certs.server_key.unlink()
        return [], "server.key: private key not found"
    if case == "unreadable certificate":
        certs.server_cert.unlink()
        certs.server_cert.mkdir()  # root reads any file; a directory is unreadable for everyone
        return [], "server.crt: is a directory"
    if case == "expired certificate":
        reissue_expired(certs, certs.server_cert)
        return [], "server.crt: expired on"
    if case == "mismatched key":
        certs.server_key.write_bytes(other.server_key.read_bytes())
        return [], "server.key: key does not match certificate"
    if case == "certificate from another CA":
        certs.server_key.write_bytes(other.server_key.read_bytes())
        certs.server_cert.write_bytes(other.server_cert.read_bytes())
        return [], "server.crt: not signed by the CA"
    if case == "host not in SANs":
        return ["--host", "127.0.0.2"], "host '127.0.0.2' is not in its SANs (127.0.0.1, localhost)"
    if case == "insecure off loopback":
        return ["--insecure", "--host", "0.0.0.0"], "plaintext is refused on a non-loopback"
    raise AssertionError(case)


COORDINATOR_CASES = (
    "missing certs directory",
    "missing key",
    "unreadable certificate",
    "expired certificate",
    "mismatched key",
    "certificate from another CA",
    "host not in SANs",
    "insecure off loopback",
)


@pytest.mark.parametrize("case", COORDINATOR_CASES)
def test_coordinator_refuses_bad_input_before_starting_anything(cli, tmp_path, case):
    extra, expected = _coordinator_case(tmp_path, case)
    args = ["coordinator", "start", "--certs", tmp_path / "certs", "--state", tmp_path / "state",
            "--host", "127.0.0.1", "--port", free_port(), *extra]  # fmt: skip
    message = refused(cli, args, tmp_path)
    assert expected in message
    assert not (tmp_path / "state" / "coordinator.json").exists()


def test_coordinator_refuses_a_port_in_use(cli, tmp_path):
    init_certs(tmp_path / "certs", ["127.0.0.1"], ["hospital-1"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = refused(cli, ["coordinator", "start", "--certs", tmp_path / "certs", "--state",
                                tmp_path / "state", "--host", "127.0.0.1", "--port", port],
                          tmp_path)  # fmt: skip
    assert f"127.0.0.1:{port} is already in use" in message


def _join_case(tmp_path: Path, case: str) -> tuple[dict[str, object], str]:
    certs = init_certs(tmp_path / "certs", ["127.0.0.1"], ["hospital-1"])
    data = write_site(tmp_path / "cleveland.csv", "cleveland")
    options: dict[str, object] = {
        "--role": "hospital", "--data": data, "--ca": certs.ca_cert,
        "--key": certs.client_private_key("hospital-1"),
        # Nobody listens here: each case must fail on its own check, before connecting.
        "--coordinator": f"127.0.0.1:{free_port()}", "--work-dir": tmp_path / "node",
    }  # fmt: skip
    if case == "data file fails the schema":
        rows = data.read_text().splitlines()
        rows[1] = rows[1].replace(rows[1].split(",")[0], "sixty", 1)  # age is numeric
        rows[2] = rows[2].rsplit(",", 1)[0] + ",7"  # disease is 0/1
        bad = tmp_path / "bad.csv"
        bad.write_text("\n".join(rows) + "\n")
        return {**options, "--data": bad}, "bad.csv: 2 problems"
    if case == "missing data file":
        return {**options, "--data": tmp_path / "none.csv"}, "file not found"
    if case == "missing key":
        return {**options, "--key": tmp_path / "none.key"}, "none.key: private key not found"
    if case == "key readable by others":
        certs.client_private_key("hospital-1").chmod(0o644)
        return options, "hospital-1.key: private key is readable by other users (mode 0644)"
    if case == "public key instead of private":
        return {**options, "--key": certs.client_public_key("hospital-1")}, (
            "hospital-1.pub: not an OpenSSH private key"
        )
    if case == "missing CA":
        return {**options, "--ca": tmp_path / "none.crt"}, "none.crt: CA certificate not found"
    if case == "CA is not a CA":
        return {**options, "--ca": certs.server_cert}, "server.crt: is not a CA certificate"
    if case == "expired CA":
        reissue_expired(certs, certs.ca_cert, ca=True)
        return options, "ca.crt: CA certificate expired on"
    if case == "insecure off loopback":
        return {**options, "--insecure": True, "--ca": None, "--coordinator": "10.0.0.1:9092"}, (
            "plaintext is refused for a non-loopback address"
        )
    if case == "coordinator unreachable":
        return options, "cannot reach the coordinator"
    raise AssertionError(case)


JOIN_CASES = (
    "data file fails the schema",
    "missing data file",
    "missing key",
    "key readable by others",
    "public key instead of private",
    "missing CA",
    "CA is not a CA",
    "expired CA",
    "insecure off loopback",
    "coordinator unreachable",
)


@pytest.mark.parametrize("case", JOIN_CASES)
def test_join_refuses_bad_input_before_starting_a_supernode(cli, tmp_path, case):
    options, expected = _join_case(tmp_path, case)
    args = ["join"]
    for key, value in options.items():
        if value is True:
            args.append(key)
        elif value is not None:
            args += [key, value]
    message = refused(cli, args, tmp_path)
    assert expected in message
    assert not (tmp_path / "node" / "supernode.log").exists()


def test_data_problems_are_all_listed_like_simulate(cli, tmp_path):
    options, _ = _join_case(tmp_path, "data file fails the schema")
    args = ["join", *[str(i) for pair in options.items() for i in pair]]
    message = refused(cli, args, tmp_path)
    assert "row 2, column 'age'" in message and "row 3, column 'disease'" in message


# ----------------------------------------------------------------------------- a real federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    with running_federation(tmp_path_factory.mktemp("federation")) as fed:
        yield fed


def _attacker_home(fed: Federation) -> Path:
    """A client's own `flwr` setup: the CA every invited client holds, the public address."""
    home = fed.root / "attacker"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "coordinator"\n[superlink.coordinator]\naddress = '
        f'"{fed.address}"\nroot-certificates = "{fed.certs.ca_cert}"\n'
    )
    return home


def _attack(fed: Federation, *args: str) -> dict:
    result = subprocess.run(
        [str(venv_bin() / "flwr"), *args, "--format", "json"],
        capture_output=True, text=True, timeout=180, check=False, cwd=fed.root,
        env=child_environment({"FLWR_HOME": str(_attacker_home(fed))}),
    )  # fmt: skip
    return json.loads(result.stdout[result.stdout.index("{") :])


def _https(fed: Federation, method: str, path: str, body: bytes = b"") -> int:
    context = ssl.create_default_context(cafile=str(fed.certs.ca_cert))
    connection = http.client.HTTPSConnection("127.0.0.1", fed.port, context=context, timeout=30)
    try:
        connection.request(method, path, body=body if method == "POST" else None,
                           headers={"content-type": "application/protobuf"})  # fmt: skip
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.slow
def test_control_plane_is_closed_to_an_invited_client(federation):
    fed = federation
    intruder = init_certs(fed.root / "intruder", ["127.0.0.1"], ["intruder"])
    own_key = fed.certs.client_public_key("hospital-1")
    attempts = {
        "register another node": (
            "supernode",
            "register",
            str(intruder.client_public_key("intruder")),
            "coordinator",
        ),
        "re-register its own key": ("supernode", "register", str(own_key), "coordinator"),
        "list nodes": ("supernode", "list", "coordinator"),
        "list runs": ("ls", "coordinator"),
        "stop a run": ("stop", "1", "coordinator"),
        "start a run": ("run", str(Path(__file__).resolve().parents[1]), "coordinator"),
    }
    for what, args in attempts.items():
        answer = _attack(fed, *args)
        assert answer["success"] is False, what
        assert "404 Not Found" in answer["error-message"], (what, answer)
    for method, path in [
        ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
        ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-task-input"), ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/stop-run"), ("POST", "/V1/control/list-runs"),
    ]:  # fmt: skip
        assert _https(fed, method, path) == 404, (method, path)
    assert _https(fed, "GET", "/v1/fleet/pull-messages") == 403  # Fleet: POST only
    assert _https(fed, "POST", "/v1/fleet/pull-messages") == 401  # ...and signed by a node
    # Nothing got through: the coordinator, on loopback, still sees exactly its two sites.
    connection, _ = connect(fed.state)
    assert len(flwr_control.list_nodes(connection)) == 2


@pytest.mark.slow
def test_control_api_on_the_coordinator_machine_answers_only_the_operator(federation):
    """Another local user reaches the SuperLink's loopback port and trusts its CA (public), but
    holds no operator credential: every Control call is refused."""
    fed = federation
    home = fed.root / "local-user"
    home.mkdir(exist_ok=True)
    loopback = fed.status()["control_address"]
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "{loopback}"\n'
        f'root-certificates = "{StateLayout(fed.state).internal_tls.ca_cert}"\n'
    )
    stranger = fed.root / "local-user-key"
    confide("certs", "keygen", "--out", str(stranger), "--name", "local-user")
    for args in (("ls", "local"), ("supernode", "list", "local"),
                 ("supernode", "register", str(stranger / "local-user.pub"), "local")):  # fmt: skip
        result = subprocess.run(
            [str(venv_bin() / "flwr"), *args, "--format", "json"],
            capture_output=True, text=True, timeout=180, check=False, cwd=home,
            env=child_environment({"FLWR_HOME": str(home)}),
        )  # fmt: skip
        answer = json.loads(result.stdout[result.stdout.index("{") :])
        assert answer["success"] is False and "403 Forbidden" in answer["error-message"], args
    assert stat.S_IMODE(StateLayout(fed.state).operator_credential.stat().st_mode) == 0o600
    assert stat.S_IMODE(fed.state.stat().st_mode) == 0o700
    connection, _ = connect(fed.state)
    assert len(flwr_control.list_nodes(connection)) == 2  # the operator's own calls work


@pytest.mark.slow
def test_two_sites_train_over_tls_while_the_public_port_is_fuzzed(federation):
    """The run trains while malformed TLS records, odd HTTP requests and garbage Fleet payloads
    hit the public port (tests/port_fuzz.py); it completes with both sites, nothing lost."""
    fed = federation
    out = fed.root / "run"
    run = Background(
        ["coordinator", "run", "--state", str(fed.state), "--rounds", "2",
         "--set", "local-epochs=1", "--out", str(out), "--quiet", "--wait-timeout", "120"],
        fed.root / "run.log",
    )  # fmt: skip
    try:
        wait_for(lambda: "2 rounds ->" in run.output() or not run.alive(), 300, "the run")
        outcomes = fuzz_public_port(fed.port, fed.certs.ca_cert)
        oversized = _https(fed, "POST", "/v1/fleet/push-object", body=b"\0" * (9 * 2**20))
        assert run.wait(timeout=RUN_TIMEOUT) == 0, run.output()[-3000:]
    finally:
        run.stop()
    (fed.root / "fuzz-outcomes.json").write_text(json.dumps(outcomes, indent=2))
    assert oversized == 413  # larger than one array chunk: refused by nginx
    assert sum(outcomes["tls"].values()) == TLS_RECORDS
    assert sum(outcomes["http"].values()) == HTTP_REQUESTS
    assert sum(outcomes["fleet"].values()) == FLEET_PAYLOADS
    assert not {"200", "ConnectionRefusedError"} & set(outcomes["fleet"]), outcomes["fleet"]
    assert fed.coordinator is not None and fed.coordinator.alive()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [entry["round"] for entry in metrics["rounds"]] == [1, 2]
    names = {client["name"] for client in metrics["rounds"][-1]["clients"]}
    assert names == {"hospital-1", "bank-1"}
    assert all(entry["failed"] == 0 for entry in metrics["rounds"])  # no reply lost
    assert metrics["config"]["num-clients"] == 2 and metrics["config"]["local-epochs"] == 1
    for name in ("model.safetensors", "accuracy_loss.png", "metrics.csv"):
        assert (out / name).stat().st_size > 0
    assert "heart: completed" in run.output()


@pytest.mark.slow
def test_a_key_never_invited_is_refused_saying_so(federation):
    made = confide("certs", "keygen", "--out", str(federation.root / "stranger"), "--name", "x-1")
    assert made.returncode == 0, made.stderr
    key = federation.root / "stranger" / "x-1.key"
    result = confide(*federation.join_args("x-1", **{"--key": str(key)}), timeout=300)
    assert result.returncode == 2
    assert f"error: not invited: the coordinator does not know the key {key}" in " ".join(
        result.stderr.split()
    )


@pytest.mark.slow
def test_a_plaintext_supernode_is_refused(federation):
    fed = federation
    result = confide(*fed.join_args("hospital-1", **{"--ca": "", "--key": ""}), "--insecure")
    assert result.returncode == 2
    assert "requires TLS; drop --insecure and pass --ca" in result.stderr
    # Flower's own SuperNode, bypassing Confide's checks, gets no further: nginx answers 400.
    log_path = fed.root / "raw-plaintext-node.log"
    with log_path.open("wb") as log:
        raw = subprocess.Popen(
            [str(venv_bin() / "flower-supernode"), "--insecure", "--superlink", fed.address,
             "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "20",
             "--node-config", key_values({"data-path": str(fed.root / "cleveland.csv")})],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=child_environment({"FLWR_HOME": str(fed.root / "raw-node")}),
        )  # fmt: skip
    try:
        assert raw.wait(timeout=180) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(raw.pid, signal.SIGKILL)  # its SuperExec child too
        raw.wait(timeout=30)
    assert "400 Bad Request" in log_path.read_text(errors="replace")


@pytest.mark.slow
def test_a_site_that_does_not_trust_the_coordinators_ca_is_refused(federation):
    other = init_certs(federation.root / "other-federation", ["127.0.0.1"], ["hospital-1"])
    result = confide(*federation.join_args("hospital-1", **{"--ca": str(other.ca_cert)}))
    assert result.returncode == 2
    assert f"not signed by the CA in {other.ca_cert}" in result.stderr
    assert "the certificate presented by 127.0.0.1" in result.stderr


@pytest.mark.slow
def test_a_coordinator_name_outside_the_certificate_is_refused(federation):
    fed = federation
    result = confide(*fed.join_args("hospital-1", **{"--coordinator": f"localhost:{fed.port}"}))
    assert result.returncode == 2
    assert "host 'localhost' is not in its SANs (127.0.0.1)" in result.stderr


@pytest.mark.slow
def test_state_survives_a_restart_and_sites_reconnect(federation):
    fed = federation
    connection, _ = connect(fed.state)
    runs_before = connection.call("ls", flwr_control.CONNECTION)["runs"]
    result = confide("coordinator", "stop", "--state", str(fed.state))
    assert result.returncode == 0 and "stopped coordinator" in result.stdout
    assert fed.coordinator is not None and fed.coordinator.wait(timeout=60) == 0
    assert not leftovers(str(fed.state))  # SuperLink, its SuperExec, nginx: all gone
    assert fed.status()["status"] == "stopped"

    fed.start_coordinator()  # same state directory, same public port, fresh loopback port
    connection, _ = connect(fed.state)
    runs_after = connection.call("ls", flwr_control.CONNECTION)["runs"]
    assert {r["run-id"] for r in runs_before} <= {r["run-id"] for r in runs_after}
    registered = json.loads(StateLayout(fed.state).registered.read_text())
    assert set(registered) == {"hospital-1", "bank-1"}
    wait_for(
        lambda: sum(n["status"] == "online" for n in flwr_control.list_nodes(connection)) == 2,
        180,
        "both sites to reconnect",
    )
    status = confide("coordinator", "status", "--state", str(fed.state))
    assert status.returncode == 0, status.stderr
    assert "hospital-1" in status.stdout and "bank-1" in status.stdout


@pytest.mark.slow
def test_a_site_invited_by_its_own_key_joins_at_once_and_a_revoked_one_is_refused(federation):
    """Keys born at the site, an invitation by public key and a revocation, all while the
    coordinator runs: no restart, and the other sites stay online throughout."""
    fed = federation
    site_keys = fed.root / "hospital-2-keys"
    made = confide("certs", "keygen", "--out", str(site_keys), "--name", "hospital-2")
    assert made.returncode == 0, made.stderr
    invited = confide("certs", "add-client", str(fed.certs.root), "hospital-2",
                      "--public-key", str(site_keys / "hospital-2.pub"))  # fmt: skip
    assert invited.returncode == 0, invited.stderr
    assert not fed.certs.client_private_key("hospital-2").exists()  # the operator never had it
    args = fed.join_args("hospital-2", **{"--key": str(site_keys / "hospital-2.key")})
    site = Background(args, fed.root / "join-hospital-2.log")
    fed.sites["hospital-2"] = site
    wait_for(lambda: "joined as node" in site.output() or not site.alive(), 300, "hospital-2")
    assert "joined as node" in site.output(), site.output()[-3000:]

    revoked = confide("certs", "revoke", str(fed.certs.root), "hospital-2")
    assert revoked.returncode == 0, revoked.stderr
    assert site.wait(timeout=120) == 2  # unregistered within seconds: its SuperNode is cut off
    assert "error: revoked:" in site.output(), site.output()[-2000:]
    again = confide(*args, timeout=300)
    assert again.returncode == 2 and "error: revoked:" in again.stderr, again.stderr
    registered = json.loads(StateLayout(fed.state).registered.read_text())
    assert set(registered) == {"hospital-1", "bank-1"}
    online = {n["name"] for n in online_sites(fed.state)[1] if n["status"] == "online"}
    assert online == {"hospital-1", "bank-1"}
