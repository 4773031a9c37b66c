"""Run the real ServerApp and ClientApp under Flower's simulation engine, in this process.

`flwr run .` works too (README), but starts a detached local SuperLink that outlives the command
and installs the app package first; `flwr.simulation.run_simulation` hands the ServerApp an empty
run config. Instead we call the engine entry point that Flower's own `flwr-simulation` process
uses (a Flower internal, reached through common/flower_compat.py), with the app directory, the
fused run config and the backend settings: same apps, no side effects, nothing left running when
it returns. Flower loads only when a run starts, so the command line stays quick for everything
else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from common.flower_compat import new_simulation_run, run_simulation_engine
from common.run_config import PROJECT_ROOT, RunConfig
from simulations.dispatch import install_one_pass_dispatch
from simulations.ray_cluster import attach

SERVER_APP = "server.app:app"
CLIENT_APP = "client.app:app"


@dataclass(frozen=True)
class Resources:
    """What one virtual client may use; Ray runs as many at once as the machine fits."""

    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    ray_address: str = ""  # HOST:PORT of a running Ray cluster to join (simulations/ray_cluster.py)

    def check_fits(self, source: str) -> None:
        cores = os.cpu_count() or 1
        if self.cpus_per_client <= 0 or (not self.ray_address and self.cpus_per_client > cores):
            raise ValueError(
                f"{source}: 'cpus-per-client' = {self.cpus_per_client} cannot fit one worker on "
                f"this machine's {cores} cores; use a number in (0, {cores}] (or a Ray cluster "
                "with --ray-address)"
            )
        if not 0 <= self.gpus_per_client <= 1:
            raise ValueError(
                f"{source}: 'gpus-per-client' = {self.gpus_per_client} must be in [0, 1] "
                "(0.25 lets four clients share one GPU)"
            )


def set_engine_environment() -> None:
    """Settings of the engine Confide runs (bench/baseline_app runs the `flower-floor` with them
    too), each left as it is when the user set it: read by Ray when it starts."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no phoning home from a hospital laptop
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray runs workers at niceness 15: on a busy laptop the virtual clients then lose the CPU to
    # everything else (measured 1.9x fewer client-rounds/s at 1,000 clients, bench/results/scale.md).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray records every actor call's state changes for its dashboard (off here) and keeps up to
    # 100,000 calls in its GCS: CPU on every side of each call, and the GCS grew from 48 to
    # 222 MiB at 10,000 clients (BENCHMARKS.md, "10,000 virtual banks"). 0 turns it off.
    os.environ.setdefault("RAY_task_events_report_interval_ms", "0")


def run_in_simulation(config: RunConfig, resources: Resources, verbose: bool = False) -> None:
    """Blocks until the ServerApp returns; raises if it failed."""
    set_engine_environment()
    from flwr.app import Context, RecordDict

    if resources.ray_address:  # joined before the engine starts, which then uses it as is
        attach(resources.ray_address, resources.cpus_per_client, resources.gpus_per_client)
    install_one_pass_dispatch()  # Flower's per-node message scan, see simulations/dispatch.py
    run = new_simulation_run(config.to_mapping())
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )
    backend_config = {
        "client_resources": {
            "num_cpus": resources.cpus_per_client,
            "num_gpus": resources.gpus_per_client,
        },
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,  # a web UI nobody asked for, and a port opened
        },
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation_engine(
        run=run,
        context=context,
        num_supernodes=config.num_clients,
        server_app=SERVER_APP,
        client_app=CLIENT_APP,
        app_dir=str(PROJECT_ROOT),
        backend_config=backend_config,
        verbose=verbose,
    )
