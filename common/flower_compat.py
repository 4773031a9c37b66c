"""Every private Flower name Confide touches, in one place, behind the Flower it was written for.

Flower 1.42 has no public API for these:
- the simulation engine entry point `flwr-simulation` itself calls (`_run_simulation`) and the
  process-wide `TaskIdentity` it expects to be set: the public `run_simulation` hands the
  ServerApp an empty run config (simulations/engine.py);
- the simulation's message dispatch (`vce_api.add_messages_to_queue`) and the in-memory
  LinkState's message check (`_check_stored_messages`), replaced for speed
  (simulations/dispatch.py), and its map of stored replies, which the coordinator reads to pull
  only answered messages (server/incoming.py);
- the fields an `Array` holds once built, set directly for arrays this process encoded itself
  (common/packed_arrays.py);
- the SuperLink's hard-coded SQLite lock wait (`sql_mixin.SQLITE_PRAGMAS`) and the `uvicorn.run`
  call through which `flower-superlink` serves its HTTP app
  (server/coordinator/superlink_launcher.py), and the console log handler of both launchers.
On another Flower series the dispatch keeps Flower's own; everything else stops with one
LibraryVersionError line. tests/test_library_compat.py checks each name against the installed
Flower, so an upgrade that moves one fails there first. (The site executor's Runtime API client,
client/flower_runtime.py, uses Flower internals without private names, behind the same check.)
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from queue import Queue
from typing import TYPE_CHECKING, Any

from common.library_versions import LibraryVersionError, require_version, version_problem

if TYPE_CHECKING:  # Flower (and with it Ray and SQLAlchemy) loads only when it is needed
    from flwr.app import Array, Context
    from flwr.supercore.run import Run

FLWR_SERIES = "1.42."
USER = "common/flower_compat.py"

AddMessages = Callable[[Any, "Queue[Any]", dict[int, int], threading.Event], None]
"""Flower's `add_messages_to_queue(state, queue, nodes_mapping, f_stop)`."""

_STORE_ATTRIBUTES = ("message_ins_store", "lock", "_check_stored_messages")
_dispatch_lock = threading.Lock()


def require_flower(user: str = USER) -> None:
    """One LibraryVersionError line unless the installed Flower is the series of these shims."""
    require_version("flwr", FLWR_SERIES, user)


# ---------------------------------------------------------------------------- simulation engine


def new_simulation_run(override_config: Mapping[str, Any]) -> Run:
    """A run record made as `flwr-simulation` makes one, carrying `override_config` so every
    virtual client sees it, and the process's task identity set to it (the engine reads it)."""
    require_flower()
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.override_config = dict(override_config)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    return run


def run_simulation_engine(
    *,
    run: Run,
    context: Context,
    num_supernodes: int,
    server_app: str,
    client_app: str,
    app_dir: str,
    backend_config: Mapping[str, Any],
    verbose: bool,
) -> None:
    """Flower's simulation engine on the Ray backend, in this process, until the ServerApp
    returns: the entry point Flower's own `flwr-simulation` process calls."""
    require_flower()
    from flwr.simulation.run_simulation import _run_simulation  # imports Ray: only when running
    from flwr.supercore.telemetry import EventType

    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=server_app,
        client_app_attr=client_app,
        backend_name="ray",
        backend_config=dict(backend_config),
        server_app_context=context,
        app_dir=app_dir,
        run=run,
        verbose_logging=verbose,
        is_app=True,
    )


# -------------------------------------------------------------------------- simulation dispatch


def replace_simulation_dispatch(make: Callable[[AddMessages], AddMessages]) -> bool:
    """Put `make(Flower's add_messages_to_queue)` in its place in the simulation engine, once.

    False, and Flower's own left in place, on another Flower series or where the function is
    gone: the replacement is only faster, so Flower's is a safe fallback.
    """
    if version_problem("flwr", FLWR_SERIES, USER) is not None:
        return False
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    with _dispatch_lock:
        current = getattr(vce_api, "add_messages_to_queue", None)
        if getattr(current, "flower_original", None) is not None:
            return True  # already replaced
        if not callable(current):
            return False
        replacement = make(current)
        replacement.flower_original = current  # type: ignore[attr-defined]
        vce_api.add_messages_to_queue = replacement
        return True


class SimulationMessageStore:
    """The in-memory LinkState's messages to nodes, which Flower offers no public view of."""

    def __init__(self, state: Any) -> None:
        self._state = state

    @property
    def lock(self) -> Any:
        """Hold it while reading or changing `messages`."""
        return self._state.lock

    @property
    def messages(self) -> dict[str, Any]:
        """Message id -> Message, oldest first, delivered ones included."""
        return self._state.message_ins_store

    def drop_invalid(self, message_ids: set[str]) -> None:
        """Flower's own check of stored messages: deletes the expired ones among `message_ids`
        and those between nodes no longer in the same federation."""
        self._state._check_stored_messages(message_ids)


def simulation_message_store(state: object) -> SimulationMessageStore | None:
    """The message store of Flower's InMemoryLinkState, or None for any other state (or one
    without the attributes this relies on)."""
    from flwr.server.superlink.linkstate import InMemoryLinkState

    if isinstance(state, InMemoryLinkState) and all(
        hasattr(state, name) for name in _STORE_ATTRIBUTES
    ):
        return SimulationMessageStore(state)
    return None


def stored_replies(state: object) -> Mapping[str, str] | None:
    """Message id -> its reply's id, for the replies Flower's InMemoryLinkState holds; None for
    any other state (or one without that map). Read it without the lock for membership only."""
    from flwr.server.superlink.linkstate import InMemoryLinkState

    replies = getattr(state, "message_ins_id_to_message_res_id", None)
    return replies if isinstance(state, InMemoryLinkState) and isinstance(replies, dict) else None


def declared_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """`Array(dtype, shape, stype, data)` as Flower's constructor leaves it, without its
    argument parsing: 6 us an array, 40 arrays in every reply of a simulation worker. Only for
    fields this process made itself (text dtype, tuple of ints, bytes)."""
    from flwr.app import Array

    array = Array.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=stype, data=data)
    return array


# ------------------------------------------------------------------------ SuperLink, SuperNode


def set_sqlite_busy_timeout(milliseconds: int) -> None:
    """Raise the busy_timeout pragma Flower applies to every new SuperLink SQLite connection
    (hard-coded to 5 s), leaving its other pragmas as they are."""
    require_flower()
    from flwr.supercore import sql_mixin

    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise LibraryVersionError(
            f"flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no busy_timeout entry; port {USER} "
            "to this Flower"
        )
    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[assignment]
        (name, str(milliseconds) if name == "busy_timeout" else value) for name, value in pragmas
    )


def wrap_superlink_http_app(wrap: Callable[[Any], Any]) -> None:
    """Make `flower-superlink` serve `wrap(app)` instead of its HTTP app: it hands the app to
    `uvicorn.run`, looked up when called, so this must run before `flower_superlink()`."""
    require_flower()
    import uvicorn

    run = uvicorn.run

    def run_wrapped(app: Any, *args: Any, **kwargs: Any) -> None:
        run(wrap(app), *args, **kwargs)

    uvicorn.run = run_wrapped


def plain_console_logs() -> None:
    """Flower's log lines with timestamps, coloured only on a terminal: written to a file
    (systemd's journal, supernode.log) they would otherwise be escape codes and no time. Only
    cosmetic, so another Flower keeps its own format."""
    if version_problem("flwr", FLWR_SERIES, USER) is not None:
        return

    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=sys.stderr.isatty())
