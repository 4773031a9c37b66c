"""Hand Flower's simulation engine its messages in one pass over the message store per sweep.

Why: Flower 1.42's simulation engine (`flwr/server/superlink/fleet/vce/vce_api.py`,
`add_messages_to_queue`) asks the in-memory LinkState for each registered node's next message every
0.1 s, and `InMemoryLinkState.get_message_ins` scans and validates every stored message to answer
for one node: O(nodes x messages) per sweep, about 10^6 checks at 1,000 virtual clients, holding the
LinkState lock, on the driver process that also runs the ServerApp. The workers wait for it. One pass
per sweep that hands out every undelivered message is O(messages): 2.1x more client-rounds/s at
1,000 clients (4.56 -> 9.61, `bench/results/scale.md`, variant confide-dispatch).

This replaces a Flower internal, so it is guarded: it is installed only on flwr 1.42.x whose
internals look as expected, and at run time it falls back to Flower's own function for any state
that is not an `InMemoryLinkState` with the attributes it relies on.

Same semantics as Flower's: messages not yet delivered, addressed to a node of this simulation,
validated with the state's own `_check_stored_messages` (expired ones are deleted, never handed
out), marked delivered with `now().isoformat()`, a sweep every 0.1 s, stop when `f_stop` is set.
Two differences: a node with several undelivered messages gets them all in one sweep (Flower gives
one per node per sweep), and the rest of the store (delivered messages, other nodes' messages),
which Flower's per-node scans validate as a side effect, is validated once a second rather than on
every ask, so expired leftovers are still deleted.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

FLWR_SERIES = "1.42."
STATE_ATTRIBUTES = ("message_ins_store", "lock", "_check_stored_messages")
SWEEP_SECONDS = 0.1  # as Flower's
FULL_CHECK_EVERY = 10  # sweeps: validate the whole store once a second

AddMessages = Callable[[Any, "Queue[Any]", dict[int, int], threading.Event], None]

_install_lock = threading.Lock()


def install_one_pass_dispatch() -> bool:
    """Replace Flower's `add_messages_to_queue`; False (and Flower's left in place) if unsafe."""
    try:
        if not importlib.metadata.version("flwr").startswith(FLWR_SERIES):
            return False
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate import InMemoryLinkState
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    with _install_lock:
        original = getattr(vce_api, "add_messages_to_queue", None)
        if getattr(original, "one_pass_original", None) is not None:
            return True  # already installed
        if not callable(original) or not callable(
            getattr(InMemoryLinkState, "_check_stored_messages", None)
        ):
            return False
        vce_api.add_messages_to_queue = _one_pass(original, InMemoryLinkState)
        return True


def _one_pass(original: AddMessages, state_class: type) -> AddMessages:
    from flwr.supercore.date import now

    def add_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        """Put Messages in the queue from the LinkState (one pass over its store per sweep)."""
        if not isinstance(state, state_class) or not all(
            hasattr(state, name) for name in STATE_ATTRIBUTES
        ):
            original(state, queue, nodes_mapping, f_stop)
            return
        nodes = frozenset(nodes_mapping)
        sweep = 0
        while not f_stop.is_set():
            batch = []
            with state.lock:
                store = state.message_ins_store
                whole_store = sweep % FULL_CHECK_EVERY == 0
                if whole_store:
                    state._check_stored_messages(set(store))  # deletes the expired ones
                pending = [
                    message_id
                    for message_id, message in store.items()
                    if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
                ]
                if pending:
                    if not whole_store:
                        state._check_stored_messages(set(pending))
                    delivered_at = now().isoformat()
                    for message_id in pending:  # store order: oldest first, as Flower's
                        message = store.get(message_id)
                        if message is not None:
                            message.metadata.delivered_at = delivered_at
                            batch.append(message)
            for message in batch:
                queue.put(message)
            sweep += 1
            f_stop.wait(SWEEP_SECONDS)

    add_messages_to_queue.one_pass_original = original  # type: ignore[attr-defined]
    return add_messages_to_queue
