"""Run the baseline app under Flower's simulation engine, in this process, like `flwr run` would.

    python -m bench.baseline_app.run --clients 100 --rounds 3 --clients-per-round 20 \
        --timing-file /tmp/x.jsonl

Same entry point as Confide's `simulations/engine.py` (`_run_simulation` with an app directory and a
fused run config), but with Flower's defaults for the backend: no `client_resources` (Flower gives
each virtual client 2 CPUs) and Ray's own CPU count. Only Ray's log level is lowered, as
`confide simulate --quiet` does.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--clients-per-round",
        type=int,
        default=0,
        help="sample this many clients per round (0: all), via fraction-train/evaluate",
    )
    parser.add_argument(
        "--dirichlet-alpha", type=float, default=2.0, help="label skew of the banks' split"
    )
    parser.add_argument("--cache-data", action="store_true")
    parser.add_argument("--noop", action="store_true", help="handlers reply at once (the floor)")
    parser.add_argument(
        "--confide-engine",
        action="store_true",
        help="the engine as Confide runs it: 1 CPU per client, Confide's Ray settings "
        "(simulations/engine.py), one-pass message dispatch (simulations/dispatch.py)",
    )
    parser.add_argument("--timing-file", default="")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    fraction = min(1.0, args.clients_per_round / args.clients) if args.clients_per_round else 1.0
    overrides = {
        "num-server-rounds": args.rounds,
        "num-clients": args.clients,
        "dirichlet-alpha": args.dirichlet_alpha,
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
        "cache-data": args.cache_data,
        "noop": args.noop,
        "timing-file": args.timing_file,
    }
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.override_config = overrides
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(APP_DIR, overrides),
    )
    backend_config: dict = (
        {} if args.verbose else {"init_args": {"logging_level": "ERROR", "log_to_driver": False}}
    )
    if args.confide_engine:
        from simulations.dispatch import install_one_pass_dispatch
        from simulations.engine import set_engine_environment

        set_engine_environment()
        install_one_pass_dispatch()
        backend_config["client_resources"] = {"num_cpus": 1.0, "num_gpus": 0.0}
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    _run_simulation(
        num_supernodes=args.clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr="bankbaseline.server_app:app",
        client_app_attr="bankbaseline.client_app:app",
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(APP_DIR),
        run=run,
        verbose_logging=args.verbose,
        is_app=True,
    )


if __name__ == "__main__":
    main()
