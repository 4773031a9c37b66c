"""`confide` with candidate library changes applied by monkeypatching, to measure them before anyone
edits library code. Nothing outside bench/ imports this.

    BENCH_PATCHES=dispatch,nice python -m bench.patched_confide simulate bank --clients 1000 ...

Patches (comma-separated in BENCH_PATCHES):

- dispatch: Flower's simulation engine (`flwr/server/superlink/fleet/vce/vce_api.py`,
  `add_messages_to_queue`) asks the in-memory LinkState for each registered node's next message
  every 0.1 s, and `InMemoryLinkState.get_message_ins` scans *every* stored message (validating each
  with `_check_stored_messages`) to answer for one node: O(nodes x messages) per sweep, about 10^6
  checks at 1,000 clients, on the driver that also runs the ServerApp. The patch hands out all
  undelivered messages in one pass per sweep: O(messages).
- nice: Ray starts its workers at niceness 15 (`RAY_worker_niceness`), so on a shared or busy
  machine the clients' training yields to every normal process, the driver's own threads
  included. The patch sets it to 0.
- client: per-worker caching in the ClientApp (`client/app.py`): the model is built once per worker
  process and per run config and reused (only `load_state_dict` per message), and the run config is
  parsed and validated once per distinct mapping. Today every message rebuilds the model
  (`build_model`, whose parameter init is wasted), re-reads and re-validates the schema TOML
  (`task_schema`) and re-validates the run config (`RunConfig.from_mapping`, `get_type_hints`).
  Workers are separate processes, so the patch is installed there with Ray's
  `worker_process_setup_hook`. Non-DP runs only (Opacus wraps the model it trains).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _dispatch_in_one_pass() -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.date import now

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # type: ignore[no-untyped-def]
        nodes = set(nodes_mapping)
        while not f_stop.is_set():
            batch = []
            with state.lock:
                store = state.message_ins_store
                pending = {
                    message_id
                    for message_id, message in store.items()
                    if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
                }
                if pending:
                    state._check_stored_messages(pending)  # drops expired ones, as Flower does
                    delivered_at = now().isoformat()
                    for message_id in pending:
                        message = store.get(message_id)
                        if message is not None:
                            message.metadata.delivered_at = delivered_at
                            batch.append(message)
            for message in batch:
                queue.put(message)
            f_stop.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue


def worker_setup() -> None:
    """Runs in every Ray worker before it takes any task (patch `client`)."""
    # This hook runs before Ray sets OMP_NUM_THREADS for the actor (floor of its CPUs: 1 with
    # Confide's default cpus-per-client), and importing client.app imports torch, which would then
    # start one thread per core. Pin what Ray would have set; a library change has no such issue.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import client.app as client_app
    from common.model_factory import build_model
    from common.run_config import RunConfig
    from common.tasks import task_schema

    models: dict[RunConfig, object] = {}

    def _received_model(msg, config):  # type: ignore[no-untyped-def]
        model = models.get(config)
        if model is None:
            model = models[config] = build_model(task_schema(config), config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return model

    configs: dict[tuple, RunConfig] = {}
    from_mapping = RunConfig.from_mapping.__func__

    def cached_from_mapping(cls, values, source="run config"):  # type: ignore[no-untyped-def]
        key = tuple(sorted(values.items()))
        config = configs.get(key)
        if config is None:
            config = configs[key] = from_mapping(cls, values, source)
        return config

    client_app._received_model = _received_model
    RunConfig.from_mapping = classmethod(cached_from_mapping)
    marker = os.environ.get("BENCH_HOOK_MARK")
    if marker:
        Path(marker).write_text("worker_setup ran\n")


def _install_worker_setup() -> None:
    import ray

    init = ray.init

    def init_with_hook(*args, **kwargs):  # type: ignore[no-untyped-def]
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["worker_process_setup_hook"] = "bench.patched_confide.worker_setup"
        kwargs["runtime_env"] = runtime_env
        return init(*args, **kwargs)

    ray.init = init_with_hook


def apply(patches: set[str]) -> None:
    unknown = patches - {"dispatch", "nice", "client"}
    if unknown:
        raise SystemExit(f"BENCH_PATCHES: unknown patch(es) {sorted(unknown)}")
    if "dispatch" in patches:
        _dispatch_in_one_pass()
    if "nice" in patches:
        os.environ["RAY_worker_niceness"] = "0"
    if "client" in patches:
        _install_worker_setup()


def main() -> None:
    apply({p for p in os.environ.get("BENCH_PATCHES", "").split(",") if p})
    from confide.cli import main as confide_main

    sys.argv[0] = "confide"
    confide_main()


if __name__ == "__main__":
    main()
