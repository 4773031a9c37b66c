"""common/flower_compat.py and common/opacus_compat.py: each private name they use still exists in
the installed library and does what Confide relies on, and another library version is one line."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sqlite3
import threading
from queue import Queue
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from common import flower_compat, library_versions, opacus_compat
from common.library_versions import LibraryVersionError


def pretend_installed(monkeypatch: pytest.MonkeyPatch, distribution: str, version: str) -> None:
    real = library_versions.installed_version
    monkeypatch.setattr(
        library_versions,
        "installed_version",
        lambda name: version if name == distribution else real(name),
    )


# ------------------------------------------------------------------------------------- versions


def test_the_installed_flower_and_opacus_are_the_series_the_shims_were_written_for() -> None:
    flower_compat.require_flower()
    opacus_compat.require_opacus()


def test_another_flower_is_one_line_naming_both_versions_and_the_fix(monkeypatch) -> None:
    pretend_installed(monkeypatch, "flwr", "1.43.0")
    with pytest.raises(LibraryVersionError) as raised:
        flower_compat.new_simulation_run({})
    message = str(raised.value)
    assert "\n" not in message
    assert "flwr 1.42.x" in message and "flwr 1.43.0 is installed" in message
    assert "pip install -e ." in message and "common/flower_compat.py" in message


def test_another_flower_keeps_the_site_executor_from_importing_anything_of_it(
    monkeypatch,
) -> None:
    pretend_installed(monkeypatch, "flwr", "2.0.0")
    spec = importlib.util.find_spec("client.flower_runtime")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)  # a fresh copy: the imported one stays
    with pytest.raises(ImportError, match=r"client/flower_runtime\.py relies on .* flwr 2\.0\.0"):
        spec.loader.exec_module(module)


def test_another_opacus_refuses_a_private_engine_before_any_training(monkeypatch) -> None:
    pretend_installed(monkeypatch, "opacus", "1.7.0")
    with pytest.raises(LibraryVersionError, match=r"opacus 1\.6\.x but opacus 1\.7\.0"):
        opacus_compat.OptimizerHookPrivacyEngine()


def test_another_flower_keeps_flowers_own_log_format(monkeypatch) -> None:
    from flwr.supercore import logger

    calls: list[Any] = []
    monkeypatch.setattr(logger, "update_console_handler", lambda **kwargs: calls.append(kwargs))
    pretend_installed(monkeypatch, "flwr", "1.43.0")
    flower_compat.plain_console_logs()
    assert calls == []


# ---------------------------------------------------------------------------- simulation engine


def test_the_engine_entry_point_takes_every_argument_confide_passes(monkeypatch) -> None:
    run_simulation = importlib.import_module("flwr.simulation.run_simulation")  # the module
    real = inspect.signature(run_simulation._run_simulation)
    bound: list[inspect.BoundArguments] = []
    monkeypatch.setattr(
        run_simulation, "_run_simulation", lambda **kwargs: bound.append(real.bind(**kwargs))
    )
    run = Run.create_empty(run_id=1)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    flower_compat.run_simulation_engine(
        run=run, context=context, num_supernodes=3, server_app="server.app:app",
        client_app="client.app:app", app_dir=".", backend_config={"init_args": {}}, verbose=False,
    )  # fmt: skip
    (arguments,) = bound
    assert arguments.arguments["run"] is run
    assert arguments.arguments["server_app_context"] is context
    assert arguments.arguments["is_app"] is True


def test_a_simulation_run_carries_the_config_and_becomes_the_task_identity(monkeypatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):  # put back whatever other tests set
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    from flwr.common.constant import SUPERLINK_NODE_ID

    run = flower_compat.new_simulation_run({"num-server-rounds": 2})
    assert run.override_config == {"num-server-rounds": 2}
    assert (TaskIdentity.run_id, TaskIdentity.task_id) == (run.run_id, run.primary_task_id)
    assert TaskIdentity.node_id == SUPERLINK_NODE_ID


# -------------------------------------------------------------------------- simulation dispatch


def test_flowers_dispatch_has_the_signature_the_replacement_keeps() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    parameters = list(inspect.signature(vce_api.add_messages_to_queue).parameters)
    assert parameters == ["state", "queue", "nodes_mapping", "f_stop"]


def test_the_in_memory_link_state_exposes_its_store_and_check() -> None:
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    check = inspect.signature(InMemoryLinkState._check_stored_messages)
    assert list(check.parameters)[:2] == ["self", "message_ids"]
    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    store = flower_compat.simulation_message_store(state)
    assert store is not None
    assert store.messages is state.message_ins_store and store.lock is state.lock
    store.drop_invalid(set())  # the check runs (deleting expired messages: tests/test_dispatch.py)
    assert flower_compat.simulation_message_store(object()) is None


def test_the_in_memory_link_state_finds_replies_through_the_map_the_coordinator_reads() -> None:
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    assert "message_ins_id_to_message_res_id" in inspect.getsource(
        InMemoryLinkState.get_message_res
    )
    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    assert flower_compat.stored_replies(state) is state.message_ins_id_to_message_res_id
    assert flower_compat.stored_replies(object()) is None


def test_a_declared_array_is_the_array_flowers_constructor_builds() -> None:
    from flwr.app import Array, ArrayRecord

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    flowers = Array(values)
    ours = flower_compat.declared_array(flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    assert vars(ours) == vars(flowers) and ours == flowers
    assert np.array_equal(ours.numpy(), values)
    assert ArrayRecord({"w": ours}).object_id == ArrayRecord({"w": flowers}).object_id


def test_a_replaced_dispatch_is_what_the_engine_calls(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    assert "add_messages_to_queue" in vce_api.run_api.__code__.co_names  # looked up when it runs
    flower_own = getattr(vce_api.add_messages_to_queue, "flower_original", None)
    monkeypatch.setattr(
        vce_api, "add_messages_to_queue", flower_own or vce_api.add_messages_to_queue
    )
    calls: list[Any] = []

    def make(original: Any) -> Any:
        def replacement(state: Any, queue: Queue[Any], mapping: dict[int, int], stop: Any) -> None:
            calls.append(original)

        return replacement

    assert flower_compat.replace_simulation_dispatch(make) is True
    vce_api.add_messages_to_queue(None, Queue(), {}, threading.Event())
    assert calls == [vce_api.add_messages_to_queue.flower_original]


# ------------------------------------------------------------------------------------ SuperLink


def test_the_superlink_applies_the_longer_busy_timeout_to_new_connections(monkeypatch) -> None:
    from flwr.supercore import sql_mixin

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    flower_compat.set_sqlite_busy_timeout(60_000)
    assert ("journal_mode", "WAL") in sql_mixin.SQLITE_PRAGMAS  # the rest untouched
    connection = sqlite3.connect(":memory:")
    sql_mixin._set_sqlite_pragmas(connection, None)  # what Flower runs on every new connection
    assert connection.execute("PRAGMA busy_timeout").fetchone() == (60_000,)


def test_the_superlink_serves_its_http_app_through_uvicorn_run(monkeypatch) -> None:
    import uvicorn

    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module
    serve = superlink._run_superlink_http_api.__code__
    assert superlink.uvicorn is uvicorn and {"uvicorn", "run"} <= set(serve.co_names)
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    flower_compat.wrap_superlink_http_app(lambda app: ("guarded", app))
    uvicorn.run(app="flower's app", host="127.0.0.1")
    assert served == [("guarded", "flower's app")]


def test_the_launchers_log_handler_takes_timestamps_and_colour() -> None:
    from flwr.supercore.logger import update_console_handler

    assert {"timestamps", "colored"} <= set(inspect.signature(update_console_handler).parameters)


# --------------------------------------------------------------------------------------- Opacus


class Recording(opacus_compat.OptimizerHookPrivacyEngine):
    def __init__(self) -> None:
        super().__init__(accountant="rdp")
        self.seen: list[DPOptimizer] = []

    def replace_optimizer(self, optimizer: DPOptimizer) -> DPOptimizer:
        self.seen.append(optimizer)
        return optimizer


def tiny_private_training(engine: PrivacyEngine) -> tuple[torch.nn.Module, DPOptimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    model, optimizer, data = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    return model, optimizer


def test_make_private_builds_its_optimizer_through_the_hook() -> None:
    assert "optimizer" in inspect.signature(PrivacyEngine._prepare_optimizer).parameters
    engine = Recording()
    _, optimizer = tiny_private_training(engine)
    assert engine.seen == [optimizer] and type(optimizer) is DPOptimizer


def test_flat_grad_sample_joins_the_accumulated_batches() -> None:
    _, optimizer = tiny_private_training(PrivacyEngine())
    parameter = optimizer.params[0]
    parameter.grad_sample = [torch.ones(2, 2, 3), torch.zeros(3, 2, 3)]
    flat = opacus_compat.flat_grad_sample(optimizer, parameter)
    assert flat.shape == (5, 2, 3) and flat[:2].eq(1).all() and flat[2:].eq(0).all()


@pytest.mark.parametrize("gradients", [torch.zeros(2), [torch.zeros(2), torch.ones(3)]])
def test_a_gradient_is_used_once_until_zero_grad(gradients) -> None:
    opacus_compat.use_once(gradients)
    with pytest.raises(ValueError, match="zero_grad"):
        opacus_compat.use_once(gradients)


@pytest.mark.parametrize("accountant", [RDPAccountant, PRVAccountant])
def test_accountants_take_a_history_through_the_public_state_dict(accountant) -> None:
    history = [(1.1, 0.01, 30), (4.0, 1.0, 1)]
    fresh = accountant()
    fresh.load_state_dict({"history": history, "mechanism": fresh.mechanism()})
    assert fresh.state_dict()["history"] == history
    stepped = accountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            stepped.step(noise_multiplier=sigma, sample_rate=q)
    assert fresh.get_epsilon(delta=1e-5) == pytest.approx(stepped.get_epsilon(delta=1e-5))
