"""Deployment commands: `confide certs`, `confide coordinator` and `confide join`.

Registered in `confide/cli.py`. Like the rest of the CLI, each command checks its inputs, hands
over to a layer (common.certificates, server.coordinator, client.join), and reports a problem as
one red line naming the file or option and the fix, exit code 2, with nothing left running.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from common.certificates.checking import describe
from common.certificates.issuing import init_certs
from common.certificates.layout import CertsLayout
from common.certificates.manifest import add_client, invite_client, revoke_client
from common.partition import PartitionError
from common.processes import ProcessError, is_loopback, stop_on_signals
from common.run_config import RunConfigError, parse_override
from common.schema import SchemaError
from common.site_data import DataFileError
from common.site_keys import CertificateError
from common.site_policy import PolicyError, load_policy
from confide.terminal import console, fail, warn

EXPIRY_WARNING_DAYS = 30

certs_app = typer.Typer(
    no_args_is_help=True,
    help="Make and inspect a federation's CA, coordinator certificate and keys.",
)
coordinator_app = typer.Typer(
    no_args_is_help=True, help="Run the federation's coordinator (Flower SuperLink behind nginx)."
)


def _split(values: list[str]) -> list[str]:
    """`--host a,b --host c` and `--clients x,y` as one list."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


# ------------------------------------------------------------------------------------ certs


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option(help="New directory for the CA, certificate and keys")],
    host: Annotated[
        list[str], typer.Option(help="Names/IPs clients dial, comma-separated (become SANs)")
    ],
    clients: Annotated[
        list[str] | None,
        typer.Option(
            help="REHEARSAL ON ONE MACHINE ONLY: also make these sites' private keys here. Real "
            "sites make their own (`certs keygen`) and you invite them with `certs add-client "
            "--public-key`"
        ),
    ] = None,
    valid_days: Annotated[int, typer.Option(help="Validity of the CA and certificate")] = 365,
    ca_key_out: Annotated[
        Path | None,
        typer.Option(help="Write the CA key here (e.g. removable media), not into --out"),
    ] = None,
) -> None:
    """Create the CA and the coordinator's TLS certificate (and, for a rehearsal, site keys)."""
    names = _split(clients or [])
    try:
        layout = init_certs(out, _split(host), names, valid_days, ca_key_out=ca_key_out)
    except CertificateError as error:
        raise fail(str(error)) from None
    ca_key = ca_key_out or layout.ca_key
    console.print(f"created {layout.root} (valid {valid_days} days):")
    console.print(_files_table(layout, names, ca_key))
    if names:
        warn(
            f"rehearsal keys: {', '.join(names)}'s private keys were made HERE "
            f"({layout.clients_dir}/NAME.key); in a real federation each site runs `confide "
            "certs keygen` itself and sends you only its .pub"
        )
    where = "" if ca_key_out else f"; move {ca_key} offline (it must not stay on the coordinator)"
    console.print(
        f"next: copy ca.crt, server.crt, server.key, clients.json and clients/*.pub to the "
        f"coordinator machine{where}; give each site ca.crt; invite each site by the public key "
        f"it made (`confide certs add-client {layout.root} NAME --public-key NAME.pub`).",
        highlight=False,
    )


def _files_table(layout: CertsLayout, clients: list[str], ca_key: Path) -> Table:
    table = Table(show_header=True)
    table.add_column("file", overflow="fold")
    table.add_column("what")
    table.add_column("who may see it")
    table.add_row(str(layout.ca_cert), "CA certificate", "everyone (public)")
    table.add_row(str(ca_key), "CA private key", "[red]the operator only, offline[/]")
    table.add_row(str(layout.server_cert), "coordinator TLS certificate", "everyone (public)")
    table.add_row(str(layout.server_key), "coordinator TLS key", "[red]coordinator machine only[/]")
    for name in clients:
        table.add_row(
            str(layout.client_private_key(name)),
            f"{name}'s private key (rehearsal)",
            f"[red]{name} only[/]",
        )
        table.add_row(str(layout.client_public_key(name)), f"{name}'s public key", "coordinator")
    table.add_row(str(layout.manifest), "invited clients", "coordinator (public)")
    return table


@certs_app.command("keygen")
def certs_keygen(
    out: Annotated[Path, typer.Option(help="Directory for NAME.key (private) and NAME.pub")],
    name: Annotated[str, typer.Option(help="This site's name, e.g. bank-1")],
) -> None:
    """At the site: make this site's own key pair; send only NAME.pub to the operator."""
    from common.site_keys import generate_site_key

    try:
        pair = generate_site_key(out, name)
    except CertificateError as error:
        raise fail(str(error)) from None
    console.print(f"private key: {pair.private_key} (mode 0600; never leaves this machine)",
                  highlight=False)  # fmt: skip
    console.print(f"public key:  {pair.public_key}", highlight=False)
    console.print(pair.public_key.read_text().strip(), highlight=False, soft_wrap=True)
    console.print(f"fingerprint: {pair.fingerprint}", highlight=False)
    console.print(
        f"next: send {pair.public_key.name} to the coordinator's operator and read them the "
        "fingerprint over the phone; join with `confide join --key "
        f"{pair.private_key} ...` once invited.",
        highlight=False,
    )


@certs_app.command("show")
def certs_show(directory: Annotated[Path, typer.Argument(help="A certificates directory")]) -> None:
    """Subjects, SANs, fingerprints and expiry; warns within 30 days of expiry."""
    try:
        certificates, keys = describe(directory)
    except CertificateError as error:
        raise fail(str(error)) from None
    for info in certificates:
        console.print(f"[bold]{info.path}[/]", highlight=False)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column(overflow="fold")
        grid.add_row("subject", info.subject)
        grid.add_row("issuer", info.issuer)
        grid.add_row("SANs", ", ".join(info.sans) or "-")
        grid.add_row("SHA-256", info.sha256_fingerprint)
        grid.add_row(
            "expires", f"{info.not_after:%Y-%m-%d %H:%M} UTC (in {info.expires_in_days} days)"
        )
        console.print(grid, highlight=False)
    clients = Table(title="invited clients")
    for column in ("name", "public key", "fingerprint (ssh-keygen -lf)"):
        clients.add_column(column, overflow="fold")
    for key in keys:
        clients.add_row(key.name, str(key.public_key_path), key.sha256_fingerprint)
    console.print(clients)
    for info in certificates:
        if info.expires_in_days < 0:
            warn(f"{info.path}: EXPIRED on {info.not_after:%Y-%m-%d}; clients will refuse it")
        elif info.expires_in_days < EXPIRY_WARNING_DAYS:
            warn(
                f"{info.path}: expires in {info.expires_in_days} days ({info.not_after:%Y-%m-%d}); "
                "plan a new federation directory and re-invite the clients"
            )


@certs_app.command("add-client")
def certs_add_client(
    directory: Annotated[Path, typer.Argument(help="The certificates directory")],
    name: Annotated[str, typer.Argument(help="The new site's name, e.g. bank-2")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="The NAME.pub the site made with `confide certs keygen`"),
    ] = None,
) -> None:
    """Invite a site by its public key (without --public-key: a rehearsal key pair made here)."""
    try:
        if public_key is not None:
            stored, print_ = invite_client(directory, name, public_key)
            console.print(f"invited {name}: public key {stored}, fingerprint {print_} (check it "
                          f"with the site)", highlight=False)  # fmt: skip
        else:
            private_key, stored = add_client(directory, name)
            warn(
                f"rehearsal: {name}'s private key was made here ({private_key}); a real site "
                "makes its own with `confide certs keygen` and you pass --public-key"
            )
    except CertificateError as error:
        raise fail(str(error)) from None
    console.print(
        "a running coordinator using this directory registers it within seconds (no restart); "
        "otherwise at its next `confide coordinator start` or `run`.",
        highlight=False,
    )


@certs_app.command("revoke")
def certs_revoke(
    directory: Annotated[Path, typer.Argument(help="The certificates directory")],
    name: Annotated[str, typer.Argument(help="The site to remove from the federation")],
) -> None:
    """Withdraw a site's invitation; a running coordinator unregisters its node within seconds."""
    try:
        when = revoke_client(directory, name)
    except CertificateError as error:
        raise fail(str(error)) from None
    console.print(
        f"revoked {name} ({when:%Y-%m-%d %H:%M} UTC): a running coordinator using this directory "
        "unregisters its node within seconds and refuses its next connection; otherwise at its "
        "next `confide coordinator start` or `run`.",
        highlight=False,
    )


# ------------------------------------------------------------------------------ coordinator


@coordinator_app.command("start")
def coordinator_start(
    state: Annotated[Path, typer.Option(help="Directory for the coordinator's state and logs")],
    certs: Annotated[
        Path | None, typer.Option(help="The certificates directory (confide certs init)")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: all)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port clients dial")] = 9092,
    insecure: Annotated[
        bool, typer.Option(help="Plaintext, loopback experiments only (never in production)")
    ] = False,
    max_request_mb: Annotated[
        int, typer.Option(help="Largest request body a site may send, MB (Flower: 5 MB chunks)")
    ] = 8,
) -> None:
    """Start the coordinator in the foreground; Ctrl-C or SIGTERM stops everything it started."""
    from server.coordinator.coordinator import (
        CoordinatorError,
        StartSettings,
        abort_on_sigterm,
        ca_key_warning,
        serve,
        start_coordinator,
    )

    if insecure:
        certs = None
        if is_loopback(host):
            warn("--insecure: clients connect WITHOUT TLS or authentication; experiments only")
    settings = StartSettings(certs=certs, state=state, host=host, port=port, insecure=insecure,
                             max_request_mb=max_request_mb)  # fmt: skip
    abort_on_sigterm()
    try:
        coordinator = start_coordinator(settings)
    except CoordinatorError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted while starting; everything started was stopped") from None
    risk = ca_key_warning(certs)
    if risk:
        warn(f"DANGER: {risk}")
    should_stop = threading.Event()
    stop_on_signals(should_stop)
    console.print(
        f"[bold green]coordinator ready[/]: clients join at {coordinator.public_address} "
        f"({'PLAINTEXT' if insecure else 'TLS'}, Fleet API only); {len(coordinator.registered)} "
        f"client key(s) registered; control API on {coordinator.connection.address} "
        "(this machine only). Ctrl-C to stop."
    )
    try:
        serve(coordinator, should_stop)
    except CoordinatorError as error:
        raise fail(str(error)) from None
    console.print("coordinator stopped")


@coordinator_app.command("stop")
def coordinator_stop(
    state: Annotated[Path, typer.Option(help="The state directory given to `start`")],
) -> None:
    """Stop the coordinator running for STATE (same as Ctrl-C in its terminal)."""
    from server.coordinator.coordinator import CoordinatorError, stop_coordinator

    try:
        pid = stop_coordinator(state)
    except CoordinatorError as error:
        raise fail(str(error)) from None
    console.print(f"stopped coordinator pid {pid}" if pid else f"no coordinator runs for {state}")


@coordinator_app.command("status")
def coordinator_status(
    state: Annotated[Path, typer.Option(help="The state directory given to `start`")],
) -> None:
    """Is the coordinator up, where, and which sites are online."""
    from server.coordinator.coordinator import CoordinatorError, online_sites

    try:
        status, nodes = online_sites(state)
    except CoordinatorError as error:
        raise fail(str(error)) from None
    console.print(
        f"coordinator pid {status['pid']} since {status['started_at']}: sites join at "
        f"{status['public_address']} ({'PLAINTEXT' if status.get('insecure') else 'TLS'}); "
        f"control API {status['control_address']}"
    )
    table = Table(title="sites")
    for column in ("name", "node", "status"):
        table.add_column(column)
    for node in nodes:
        table.add_row(node["name"], node["node"], node["status"])
    console.print(table)


@coordinator_app.command("run")
def coordinator_run(
    state: Annotated[Path, typer.Option(help="The state directory of the running coordinator")],
    out: Annotated[Path | None, typer.Option(help="Run directory (metrics, model, plots)")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run directory after its last round")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Server rounds")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for any run-config key")
    ] = None,
    clients: Annotated[
        int | None, typer.Option(help="Clients to wait for (default: every invited client)")
    ] = None,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for the clients")] = 600,
    timeout: Annotated[float, typer.Option(help="Seconds the run may take")] = 6 * 3600,
    quiet: Annotated[bool, typer.Option(help="No live display (CI)")] = False,
    secagg: Annotated[
        bool, typer.Option(help="SecAgg+: the coordinator sees only the masked sum of the models")
    ] = False,
    schema: Annotated[
        Path | None,
        typer.Option(help="A custom task: the schema every site joined with (--schema)"),
    ] = None,
) -> None:
    """Train on the joined clients and write the run directory, like `confide simulate`."""
    from server.coordinator.coordinator import CoordinatorError
    from server.coordinator.coordinator_run import RunRequest, submit_run, wait_for_run
    from simulations.progress import RoundProgress, summary_table

    if (out is None) == (resume is None):
        raise fail("pass either --out DIR for a new run or --resume DIR to continue one")
    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
    except RunConfigError as error:
        raise fail(str(error)) from None
    if secagg:
        overrides["secagg"] = True
    request = RunRequest(
        state=state, out=out or resume, rounds=rounds, overrides=overrides, clients=clients,
        wait_timeout=wait_timeout, run_timeout=timeout, resume=resume is not None, schema=schema,
    )  # fmt: skip

    shown: list[int] = []

    def waiting(online: int, expected: int) -> None:
        """On a terminal one line that updates; in a file (systemd, CI) a line per change."""
        if quiet:
            return
        if console.is_terminal:
            console.print(f"waiting for clients: {online}/{expected} online", end="\r")
        elif shown[-1:] != [online]:
            shown.append(online)
            console.print(f"waiting for clients: {online}/{expected} online")

    try:
        submitted = submit_run(request, on_wait=waiting)
        console.print(
            f"run {submitted.run_id}: {submitted.config.task}, {submitted.expected_clients} "
            f"clients, {submitted.config.num_server_rounds} rounds -> {submitted.run_dir}"
        )
        if quiet:
            metrics = wait_for_run(submitted, timeout)
        else:
            with RoundProgress(submitted.run_dir, submitted.config.num_server_rounds, console):
                metrics = wait_for_run(submitted, timeout)
    except CoordinatorError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; a submitted run was stopped on the coordinator") from None
    console.print(summary_table(metrics))
    console.print(f"run directory: {submitted.run_dir}")


# ------------------------------------------------------------------------------------- join


def show_refusal(reason: str) -> None:
    """One line per request the site declined, naming the policy field (escaped: a reason may
    quote a policy's `[sites.NAME]` table, which is not markup)."""
    console.print(f"[bold yellow]refusal:[/] {escape(reason)}", soft_wrap=True, highlight=False)


def join(
    role: Annotated[str, typer.Option(help="hospital | bank")],
    data: Annotated[Path, typer.Option(help="Your records (CSV/JSONL); never leaves this machine")],
    coordinator: Annotated[str, typer.Option(help="HOST:PORT of the coordinator")],
    ca: Annotated[Path | None, typer.Option(help="The federation's ca.crt")] = None,
    key: Annotated[Path | None, typer.Option(help="Your clients/NAME.key")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Your privacy ledger (JSON)")] = None,
    name: Annotated[str | None, typer.Option(help="Your name in reports (default: key name)")] = (
        None
    ),
    task: Annotated[
        str | None, typer.Option(help="The federation's task (default: heart/bank by role)")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="Custom task: the federation's schema")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="SuperNode's working directory and log")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Plaintext, loopback experiments only (never in production)")
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(help="Your site's privacy policy (TOML; docs/privacy.md); default: strict"),
    ] = None,
    require_dp: Annotated[
        bool | None,
        typer.Option(
            "--require-dp/--no-require-dp", help="Refuse runs without DP-SGD (default: yes)"
        ),
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="Your data set's lifetime epsilon (default 3)")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Your delta (default: a power of ten <= 1/(10 n))")
    ] = None,
) -> None:
    """Check your data file and policy, then connect to the coordinator and train when it asks."""
    from client.join import (
        DEFAULT_TASK,
        JoinError,
        JoinSettings,
        explain_exit,
        prepare_join,
        start_supernode,
        supervise,
    )

    if insecure and is_loopback(coordinator.rpartition(":")[0].strip("[]")):
        warn("--insecure: model updates travel WITHOUT TLS; loopback experiments only")
        if key is not None:
            warn("--key is ignored with --insecure (Flower authenticates SuperNodes only over TLS)")
    if insecure:
        key = None
    flags = {"require-dp": require_dp, "max-epsilon": max_epsilon, "delta": delta}
    try:
        site_policy = load_policy(policy, {k: v for k, v in flags.items() if v is not None})
    except PolicyError as error:
        raise fail(str(error)) from None
    settings = JoinSettings(
        role=role, data=data, coordinator=coordinator, ca=ca, key=key,
        name=name or (key.stem if key else role), ledger=ledger, task=task, schema=schema,
        insecure=insecure, work_dir=work_dir, policy=site_policy,
    )  # fmt: skip
    schema_name = str(schema) if schema else (task or DEFAULT_TASK.get(role, "?"))
    console.print(f"checking {data} against the federation's schema ({schema_name})")
    try:
        plan = prepare_join(settings)
    except (JoinError, DataFileError, SchemaError, PartitionError, RunConfigError) as error:
        raise fail(str(error)) from None
    console.print(
        f"{plan.records} records OK; "
        f"{'PLAINTEXT, no identity check' if insecure else 'coordinator certificate verified'}; "
        f"connecting to {plan.host}:{plan.port} as {settings.name} ({role})"
    )
    for line in site_policy.lines():
        console.print(line)
    console.print(f"privacy ledger: {plan.ledger}")
    should_stop = threading.Event()
    stop_on_signals(should_stop)
    try:
        process = start_supernode(plan, settings.name)
    except ProcessError as error:
        raise fail(str(error)) from None

    def connected(node: str) -> None:
        console.print(
            f"[bold green]joined[/] as node {node}; waiting for training (Ctrl-C to leave). "
            f"Log: {process.log_path}"
        )

    code = supervise(process, should_stop.is_set, connected, show_refusal)
    if code is not None:
        raise fail(explain_exit(process, key))
    console.print("left the federation")
