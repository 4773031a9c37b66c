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

(A third patch, `client`, measured the per-worker model and run-config cache; the ClientApp now
does that itself, see `client/app.py`. Likewise `nice` is now what `simulations/engine.py` sets.)
"""

from __future__ import annotations

import os
import sys


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


def apply(patches: set[str]) -> None:
    unknown = patches - {"dispatch", "nice"}
    if unknown:
        raise SystemExit(f"BENCH_PATCHES: unknown patch(es) {sorted(unknown)}")
    if "dispatch" in patches:
        _dispatch_in_one_pass()
    if "nice" in patches:
        os.environ["RAY_worker_niceness"] = "0"


def main() -> None:
    apply({p for p in os.environ.get("BENCH_PATCHES", "").split(",") if p})
    from confide.cli import main as confide_main

    sys.argv[0] = "confide"
    confide_main()


if __name__ == "__main__":
    main()
