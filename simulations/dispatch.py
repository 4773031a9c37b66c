"""Hand Flower's simulation engine its messages in one pass over the message store per sweep.

Why: Flower 1.42's simulation engine (`flwr/server/superlink/fleet/vce/vce_api.py`,
`add_messages_to_queue`) asks the in-memory LinkState for each registered node's next message every
0.1 s, and `InMemoryLinkState.get_message_ins` scans and validates every stored message to answer
for one node: O(nodes x messages) per sweep, about 10^6 checks at 1,000 virtual clients, holding the
LinkState lock, on the driver process that also runs the ServerApp. The workers wait for it. One pass
per sweep that hands out every undelivered message is O(messages): 2.1x more client-rounds/s at
1,000 clients (4.56 -> 9.61, `bench/results/scale.md`, variant confide-dispatch).

This replaces a Flower internal, so it is guarded (common/flower_compat.py, which holds every
Flower internal it touches): it is installed only on flwr 1.42.x, and at run time it falls back to
Flower's own function for any state that is not an `InMemoryLinkState` with the attributes it
relies on.

Same semantics as Flower's: messages not yet delivered, addressed to a node of this simulation,
validated with the state's own check (`SimulationMessageStore.drop_invalid`: expired ones are
deleted, never handed out), marked delivered with `now().isoformat()`, a sweep every 0.1 s, stop
when `f_stop` is set. Two differences: a node with several undelivered messages gets them all in
one sweep (Flower gives one per node per sweep), and the rest of the store (delivered messages,
other nodes' messages), which Flower's per-node scans validate as a side effect, is validated
once a second rather than on every ask, so expired leftovers are still deleted.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

from common.flower_compat import AddMessages, replace_simulation_dispatch, simulation_message_store

SWEEP_SECONDS = 0.1  # as Flower's
FULL_CHECK_EVERY = 10  # sweeps: validate the whole store once a second


def install_one_pass_dispatch() -> bool:
    """Replace Flower's `add_messages_to_queue`; False (and Flower's left in place) if unsafe."""
    return replace_simulation_dispatch(_one_pass)


def _one_pass(original: AddMessages) -> AddMessages:
    from flwr.supercore.date import now

    def add_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        """Put Messages in the queue from the LinkState (one pass over its store per sweep)."""
        store = simulation_message_store(state)
        if store is None:
            original(state, queue, nodes_mapping, f_stop)
            return
        nodes = frozenset(nodes_mapping)
        sweep = 0
        while not f_stop.is_set():
            batch = []
            with store.lock:
                messages = store.messages
                whole_store = sweep % FULL_CHECK_EVERY == 0
                if whole_store:
                    store.drop_invalid(set(messages))  # deletes the expired ones
                pending = [
                    message_id
                    for message_id, message in messages.items()
                    if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
                ]
                if pending:
                    if not whole_store:
                        store.drop_invalid(set(pending))
                    delivered_at = now().isoformat()
                    for message_id in pending:  # store order: oldest first, as Flower's
                        message = messages.get(message_id)
                        if message is not None:
                            message.metadata.delivered_at = delivered_at
                            batch.append(message)
            for message in batch:
                queue.put(message)
            sweep += 1
            f_stop.wait(SWEEP_SECONDS)

    return add_messages_to_queue
