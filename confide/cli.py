"""`confide`: the command line front door. Each command checks its inputs, then hands over to a layer
(simulations, common, server, client); no federated-learning logic lives here."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from common.federated_model import initial_federated_state
from common.partition import PartitionError, partition_plan
from common.pretrained_checkpoint import InitCheckpointError
from common.privacy import PrivacyConfigError
from common.privacy_ledger import LedgerError, RunSummary, summarize
from common.run_config import RunConfigError, parse_override
from common.schema import SchemaError
from common.schema_inference import infer_schema
from common.site_data import DataFileError
from common.tasks import load_task, task_schema
from confide.deploy_cli import certs_app, coordinator_app, join
from confide.terminal import console, fail, warn
from server.tensorboard_export import export_tensorboard, tensorboard_missing
from simulations.scenario import Scenario, ScenarioError
from simulations.sweep import plan_sweep

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
schema_app = typer.Typer(no_args_is_help=True, help="Write and check data schemas.")
app.add_typer(schema_app, name="schema")

USER_ERRORS = (
    ScenarioError,
    RunConfigError,
    DataFileError,
    SchemaError,
    PartitionError,
    PrivacyConfigError,
    InitCheckpointError,
)


def partition_overrides(spec: str) -> dict[str, Any]:
    """`iid`, `dirichlet:0.3` or `column:hospital` as run-config settings."""
    kind, _, argument = spec.partition(":")
    if kind == "iid" and not argument:
        return {"partitioner": "iid"}
    if kind == "dirichlet":
        try:
            return {"partitioner": "dirichlet", "dirichlet-alpha": float(argument or 0.5)}
        except ValueError:
            pass
    if kind == "column" and argument:
        return {"partitioner": "natural", "partition-column": argument}
    raise RunConfigError(
        f"--partition {spec!r}: use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or column:NAME"
    )


@app.command()
def simulate(
    scenario: Annotated[str, typer.Argument(help="A preset (heart, bank, ...) or a .toml file")] = (
        "heart"
    ),
    rounds: Annotated[int | None, typer.Option(help="Server rounds")] = None,
    clients: Annotated[int | None, typer.Option(help="Virtual clients")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for any run-config key")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Your own CSV/JSONL file")] = None,
    schema: Annotated[Path | None, typer.Option(help="Its schema (confide schema infer)")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid | dirichlet:ALPHA | column:NAME")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run directory after its last round")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No live display (CI)")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs")] = False,
    tensorboard: Annotated[
        bool, typer.Option(help="Also write RUN/tensorboard/ (needs tensorboard installed)")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of a running Ray cluster to run the clients on (left running)"
        ),
    ] = None,
) -> None:
    """Rehearse a federation on this machine with Flower's simulation engine.

    A list in the scenario (`target-epsilon = [1, 3, 8]`) sweeps: one run per value (per
    combination, for several lists) under --out, then one comparison table and plot."""
    if tensorboard and (missing := tensorboard_missing()):
        raise fail(missing)
    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if clients is not None:
            overrides["num-clients"] = clients
        if data is not None or schema is not None:
            if data is None or schema is None:
                raise RunConfigError("--data and --schema go together: pass both")
            overrides.update(
                {
                    "task": "custom",
                    "data-file": str(data.resolve()),
                    "schema-file": str(schema.resolve()),
                }
            )
        if partition is not None:
            overrides.update(partition_overrides(partition))
        if resume is not None:  # the settings the run started with, then today's overrides
            run_dir = resume.resolve()
            overrides = {**resumable_config(run_dir), **overrides, "resume": True}
        else:
            default_name = data.stem if data else Path(scenario).stem
            run_dir = (out or Path("runs") / default_name).resolve()
        runs = plan_sweep(scenario, overrides, run_dir)
        for run in runs:  # data problems surface here, before any process starts
            load_task(run.scenario.config)
            partition_plan(run.scenario.config)
            initial_federated_state(task_schema(run.scenario.config), run.scenario.config)
    except USER_ERRORS as error:
        raise fail(str(error)) from None
    if ray_address is not None:
        runs = [replace(run, scenario=on_cluster(run.scenario, ray_address)) for run in runs]
    if not runs[0].values:
        simulate_run(runs[0].scenario, resume is None, quiet, verbose, tensorboard)
        return
    from simulations.sweep_report import comparison_rows, comparison_table, write_comparison

    failed = []
    for number, run in enumerate(runs, 1):
        console.rule(f"sweep run {number}/{len(runs)}: {run.label}")
        try:
            simulate_run(run.scenario, True, quiet, verbose, tensorboard)
        except typer.Exit:  # already reported; the other runs still compare
            failed.append(run.label)
    rows = comparison_rows(runs)
    title = f"sweep of {runs[0].scenario.name}"
    console.print(comparison_table(rows, title))
    write_comparison(rows, run_dir, title)
    console.print(f"comparison: {run_dir / 'sweep.md'}, sweep.csv, sweep.png")
    if failed:
        raise fail(f"{len(failed)} of {len(runs)} sweep runs failed: {', '.join(failed)}")


def on_cluster(plan: Scenario, ray_address: str) -> Scenario:
    return replace(plan, resources=replace(plan.resources, ray_address=ray_address))


def simulate_run(
    plan: Scenario, fresh: bool, quiet: bool, verbose: bool, tensorboard: bool
) -> None:
    """One run in its run directory, with live progress unless quiet; exits 2 if it failed."""
    from server.run_record import read_metrics
    from simulations.engine import run_in_simulation
    from simulations.progress import RoundProgress, summary_table

    run_dir = Path(plan.config.run_dir)
    names, _ = partition_plan(plan.config)
    console.print(
        f"[bold]{plan.name}[/]: {plan.description or plan.config.task} - "
        f"{len(names)} clients, {plan.config.num_server_rounds} rounds, "
        f"strategy {plan.config.strategy} -> {run_dir}"
    )
    if plan.resources.ray_address:
        from simulations.ray_cluster import RayClusterError, attach

        try:
            resources = plan.resources
            console.print(
                attach(
                    resources.ray_address, resources.cpus_per_client, resources.gpus_per_client
                ).line()
            )
        except RayClusterError as error:
            raise fail(str(error)) from None
    if fresh:
        (run_dir / "metrics.json").unlink(missing_ok=True)
    try:
        if quiet:
            run_in_simulation(plan.config, plan.resources, verbose)
        else:
            with RoundProgress(run_dir, plan.config.num_server_rounds, console):
                run_in_simulation(plan.config, plan.resources, verbose)
    except Exception as error:  # the ServerApp's own failure, already recorded in metrics.json
        metrics = read_metrics(run_dir) or {}
        raise fail(f"simulation failed: {metrics.get('error') or error}") from None
    metrics = read_metrics(run_dir)
    if metrics is None or metrics.get("status") != "completed":
        raise fail(f"simulation ended without a completed run; see {run_dir / 'metrics.json'}")
    console.print(summary_table(metrics))
    if tensorboard:
        export_tensorboard(metrics, run_dir / "tensorboard")
    console.print(f"run directory: {run_dir} (report.md)")


@app.command()
def audit(
    scenario: Annotated[str, typer.Argument(help="A preset (heart, bank, ...) or a .toml file")],
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/audit-NAME)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for any run-config key")
    ] = None,
    canaries: Annotated[
        int | None,
        typer.Option(
            help="Canaries per site (default: 4000 over all sites; black-box: at most the "
            "smallest site's records)"
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="white-box-gradient (default under DP) | black-box-input (default)"),
    ] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound")] = 0.95,
    rounds: Annotated[int | None, typer.Option(help="Server rounds")] = None,
    quiet: Annotated[bool, typer.Option(help="No live display (CI)")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs")] = False,
) -> None:
    """Check the privacy claim: an empirical lower bound on epsilon from one run.

    Every simulated site plants canaries in its own training (half of them, at random, kept
    out); the bound follows from how many the trained model gives away (Steinke et al. 2023).
    Writes RUN/audit.json and an audit section in RUN/report.md."""
    from common.privacy_audit import AuditSettingError
    from simulations.audit import audit_scenario, run_audit
    from simulations.scenario import load_scenario

    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        run_dir = (out or Path("runs") / f"audit-{Path(scenario).stem}").resolve()
        overrides["run-dir"] = str(run_dir)
        plan = audit_scenario(load_scenario(scenario, overrides), kind, canaries, confidence)
        load_task(plan.config)
    except (*USER_ERRORS, AuditSettingError) as error:
        raise fail(str(error)) from None
    try:
        result = run_audit(plan, confidence, lambda p: simulate_run(p, True, quiet, verbose, False))
    except AuditSettingError as error:
        raise fail(str(error)) from None
    document = result.document
    console.print(
        f"audit ({document['kind']}, {document['method']}): epsilon >= {document['epsilon_lower_bound']:.3f} at "
        f"{confidence:.0%} confidence, delta {document['delta']:g} "
        f"({document['correct']} of {document['guesses']} guesses right, "
        f"{document['canaries']} canaries)"
    )
    claim = document["claimed_epsilon"]  # without one, the verdict says so (NO_CLAIM)
    console.print(f"{document['verdict']}\naudit: {run_dir / 'audit.json'} (report.md)")
    if claim is not None and document["epsilon_lower_bound"] > claim:
        raise typer.Exit(code=1)


@app.command()
def pretrain(
    scenario: Annotated[
        str, typer.Argument(help="A text preset (banking77, medical-text) or a .toml file")
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors)")],
    corpus: Annotated[str, typer.Option(help="Public corpus shipped in data/")] = "clinc150",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the corpus")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Initialisation, order and sample")] = 0,
    max_queries: Annotated[
        int | None, typer.Option(min=1, help="Train on this many queries only (a quick try)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for any run-config key")
    ] = None,
) -> None:
    """Pretrain the task's text encoder centrally on a public corpus; start a federation from it
    with `--set init-checkpoint=CKPT`.

    Width, depth, heads and tokenizer come from the scenario (as `confide simulate` runs it), so
    the checkpoint fits that federation; optimiser, learning rate and batch size too."""
    from common.public_corpus import CorpusError
    from simulations.pretraining import pretrain as run_pretraining
    from simulations.scenario import load_scenario

    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        config = load_scenario(scenario, overrides).config
        if task_schema(config).text is None:
            raise RunConfigError(
                f"{scenario}: task {config.task!r} is tabular; pretraining trains a text encoder "
                "(banking77, medical-text, or a custom text schema)"
            )
        result = run_pretraining(config, corpus, out.resolve(), epochs, seed, max_queries)
    except (*USER_ERRORS, CorpusError) as error:
        raise fail(str(error)) from None
    console.print(
        f"pretrained on {result.corpus} ({result.train_queries} queries, {epochs} epochs, "
        f"{result.seconds:.0f} s): validation accuracy {result.validation_accuracy:.4f} on "
        f"{result.validation_queries} queries\ncheckpoint: {result.checkpoint} "
        f"({result.checkpoint.stat().st_size / 1e6:.1f} MB, corpus sha256 {result.corpus_sha256})",
        soft_wrap=True,
    )


def resumable_config(run_dir: Path) -> dict[str, Any]:
    """The settings a run was started with, from its metrics.json."""
    from server.run_record import ResumeError, resumable_metrics

    try:
        return dict(resumable_metrics(run_dir)["config"])
    except ResumeError as error:
        raise RunConfigError(f"--resume {run_dir}: {error}") from None


@schema_app.command("infer")
def schema_infer(
    file: Annotated[Path, typer.Argument(help="A CSV or JSONL file")],
    label: Annotated[str, typer.Option(help="The column to predict")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default FILE.schema.toml)")
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option(help="A column that is no feature (repeat for several)")
    ] = None,
    list_categories: Annotated[
        bool,
        typer.Option(
            help="Copy the label's and each categorical column's values from FILE (record "
            "content: review them before sharing)"
        ),
    ] = False,
) -> None:
    """Draft a schema (TOML) from a file's columns; type its TODOs, then share it."""
    try:
        draft = infer_schema(file, label, ignore=ignore or (), list_values=list_categories)
    except (DataFileError, SchemaError) as error:
        raise fail(str(error)) from None
    target = out or file.with_suffix(".schema.toml")
    draft.save(target)
    console.print(
        f"wrote {target}: {len(draft.numeric)} numeric, {len(draft.categorical)} categorical"
        f"{', text ' + repr(draft.text) if draft.text else ''}; label {draft.label!r}",
        soft_wrap=True,
        markup=False,
    )
    if todo := draft.todo():
        console.print(
            f"type in it, from reference values the federation agrees on (not from {file}'s "
            "records), then share it:\n  " + "\n  ".join(todo),
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    if list_categories:
        warn(
            f"{target} lists the label's and categorical columns' values found in {file}: "
            "record content (a value seen once tells every party that record exists); review "
            "each before sharing it with the federation"
        )


@app.command()
def privacy(
    ledger: Annotated[Path, typer.Argument(help="A client's privacy ledger (JSON)")],
    delta: Annotated[float | None, typer.Option(help="Report epsilon at this delta")] = None,
) -> None:
    """What a data set has spent: epsilon per run and in total, always with its delta."""
    from rich.table import Table

    try:
        runs = summarize(ledger, delta)
    except (LedgerError, PrivacyConfigError) as error:
        raise fail(str(error)) from None
    table = Table(title=f"privacy ledger {ledger}")
    for column in ("data set", "run", "rounds", "evaluations", "epsilon, cumulative", "left"):
        table.add_column(column, justify="right", overflow="fold")
    for run in runs:
        left = "" if run.budget_left is None else f"{run.budget_left:.3f} of {run.target_epsilon:g}"
        table.add_row(
            run.fingerprint, run.run_id, str(run.rounds), str(run.evaluations),
            f"{run.epsilon:.3f} at delta {run.delta:g}", left,
        )  # fmt: skip
    console.print(table)
    totals: dict[str, RunSummary] = {run.fingerprint: run for run in runs}  # last run = total
    for name, run in totals.items():
        split = ", ".join(f"{purpose} alone {eps:.3f}" for purpose, eps in run.split.items() if eps)
        console.print(
            f"data set {name!r} ({run.source or 'source not recorded'}): total epsilon "
            f"{run.epsilon:.3f} at delta {run.delta:g} ({split}; they compose to the total)"
            + (f", budget left {run.budget_left:.3f}" if run.budget_left is not None else "")
        )


app.add_typer(certs_app, name="certs")
app.add_typer(coordinator_app, name="coordinator")
app.command()(join)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
