"""simulations/dispatch.py: Flower's message dispatch in one pass, on a real InMemoryLinkState."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from queue import Empty, Queue
from typing import Any

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
)
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.date import now
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from common import library_versions
from simulations.dispatch import install_one_pass_dispatch


@pytest.fixture
def flower_original() -> Iterator[Any]:
    """Flower's own add_messages_to_queue in place for the test; whatever was there put back."""
    before = vce_api.add_messages_to_queue
    original = getattr(before, "flower_original", before)
    vce_api.add_messages_to_queue = original
    yield original
    vce_api.add_messages_to_queue = before


def new_state(nodes: int) -> tuple[InMemoryLinkState, int, list[int]]:
    """A LinkState set up as Flower's simulation sets it up: one run, nodes online."""
    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, None, TaskType.SERVER_APP
    )
    node_ids = []
    for _ in range(nodes):
        node_id = state.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            secrets.token_bytes(32),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        node_ids.append(node_id)
    return state, run_id, node_ids


def push(state: InMemoryLinkState, run_id: int, node_id: int) -> str:
    message = Message(
        content=RecordDict(),
        metadata=Metadata(
            run_id=run_id,
            message_id=str(uuid.uuid4()),
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=node_id,
            reply_to_message_id="",
            group_id="1",
            created_at=now().timestamp(),
            ttl=60.0,
            message_type="train",
        ),
    )
    message_id = state.store_message_ins(message)
    assert message_id is not None
    return message_id


def drain(queue: Queue[Message], count: int, timeout: float = 3.0) -> list[Message]:
    return [queue.get(timeout=timeout) for _ in range(count)]


def test_installs_on_this_flower_once(flower_original):
    assert install_one_pass_dispatch() is True
    installed = vce_api.add_messages_to_queue
    assert installed is not flower_original
    assert installed.flower_original is flower_original
    assert install_one_pass_dispatch() is True
    assert vce_api.add_messages_to_queue is installed


def test_leaves_flower_alone_on_another_version(flower_original, monkeypatch):
    monkeypatch.setattr(library_versions, "installed_version", lambda _name: "1.43.0")
    assert install_one_pass_dispatch() is False
    assert vce_api.add_messages_to_queue is flower_original


def test_every_message_for_a_simulated_node_is_queued_once(flower_original):
    assert install_one_pass_dispatch()
    state, run_id, node_ids = new_state(5)
    simulated, outsider = node_ids[:4], node_ids[4]
    nodes_mapping = {node_id: partition for partition, node_id in enumerate(simulated)}

    # Before the first sweep: one message delivered earlier (by Flower's own call) that has since
    # expired, two for each simulated node, one for a node of no mapping, one already expired.
    leftover = push(state, run_id, simulated[1])
    assert [m.metadata.message_id for m in state.get_message_ins(simulated[1], None)] == [leftover]
    state.message_ins_store[leftover].metadata.created_at -= 3600
    first = [push(state, run_id, node_id) for node_id in simulated for _ in range(2)]
    outsiders = push(state, run_id, outsider)
    expired = push(state, run_id, simulated[0])
    state.message_ins_store[expired].metadata.created_at -= 3600

    queue: Queue[Message] = Queue()
    f_stop = threading.Event()
    thread = threading.Thread(
        target=vce_api.add_messages_to_queue,
        args=(state, queue, nodes_mapping, f_stop),
        daemon=True,
    )
    thread.start()
    try:
        queued = drain(queue, len(first))
        later = [push(state, run_id, node_id) for node_id in simulated]  # while it runs
        queued += drain(queue, len(later))
        f_stop.wait(0.35)  # a few more sweeps: nothing is handed out twice
        with pytest.raises(Empty):
            queue.get_nowait()
    finally:
        f_stop.set()
        thread.join(timeout=2)
    assert not thread.is_alive()

    counts = Counter(message.metadata.message_id for message in queued)
    assert counts == Counter(first + later)
    assert all(message.metadata.delivered_at != "" for message in queued)
    assert expired not in state.message_ins_store
    assert leftover not in state.message_ins_store
    for node_id in simulated:
        assert state.get_message_ins(node_id, None) == []
    assert [m.metadata.message_id for m in state.get_message_ins(outsider, None)] == [outsiders]


class NotALinkState:
    """Has what Flower's own add_messages_to_queue calls, and none of what the one pass needs."""

    def __init__(self, f_stop: threading.Event) -> None:
        self.f_stop = f_stop
        self.asked: list[tuple[int, int | None]] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[Message]:
        self.asked.append((node_id, limit))
        self.f_stop.set()  # one sweep
        return []


class StrippedLinkState(InMemoryLinkState):
    """An InMemoryLinkState without the store and lock that the one pass relies on."""

    def __init__(self, f_stop: threading.Event) -> None:  # skips InMemoryLinkState's
        self.f_stop = f_stop
        self.asked: list[tuple[int, int | None]] = []

    def get_message_ins(self, node_id: int, limit: int | None, **_: Any) -> list[Message]:
        self.asked.append((node_id, limit))
        self.f_stop.set()
        return []


@pytest.mark.parametrize("state_type", [NotALinkState, StrippedLinkState])
def test_other_states_get_flowers_own_dispatch(flower_original, state_type):
    assert install_one_pass_dispatch()
    f_stop = threading.Event()
    state = state_type(f_stop)
    assert not hasattr(state, "message_ins_store")
    thread = threading.Thread(
        target=vce_api.add_messages_to_queue,
        args=(state, Queue(), {11: 0, 12: 1}, f_stop),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert state.asked == [(11, 1), (12, 1)]  # Flower's: one message per node per sweep
