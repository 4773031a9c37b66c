"""SecAgg+ rounds with the real ClientApp over an in-process grid: what the coordinator may and may
not see, how close the secure average is to plain FedAvg, and a halted round stopping the run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

import client.secure_aggregation as client_secagg
from client.app import app as client_app
from common.model_factory import build_model
from common.run_config import RunConfig, RunConfigError
from common.tasks import task_schema
from server.app import update_policy
from server.federation import run_federation, run_round
from server.federation_error import FederationError
from server.run_record import RunRecorder
from server.secure_aggregation import SecureAggregation
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid

HOSPITALS = {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}


class WireGrid(LocalGrid):
    """Delivers a copy of each message, as a SuperLink's serialisation would: SecAgg+'s setup
    stage sends one RecordDict object to every client, and `secaggplus_mod` pops from it. Keeps
    every reply the coordinator received, for inspection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)
        self.received += replies
        return replies


def secure_config(**overrides) -> RunConfig:
    return RunConfig.from_mapping(
        {"secagg": True, "local-epochs": 1, "num-server-rounds": 1, **overrides}
    )


def make_grid(config: RunConfig, nodes=HOSPITALS, tamper=None) -> WireGrid:
    return WireGrid(client_app, config.to_mapping(), nodes, tamper=tamper)


def coordinator_context(config: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_mapping()
    )


def initial_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(build_model(task_schema(config), config).state_dict())


@pytest.fixture
def trained_models(monkeypatch) -> dict[str, tuple[int, list[np.ndarray]]]:
    """Each client's trained model and weight, taken on the client before masking."""
    seen: dict[str, tuple[int, list[np.ndarray]]] = {}
    to_fit_res = client_secagg._fit_res

    def spy(content: RecordDict, max_weight: int) -> RecordDict:
        arrays = [array.numpy().copy() for array in content["arrays"].values()]
        seen[content["client"]["name"]] = (int(content["metrics"]["num-examples"]), arrays)
        return to_fit_res(content, max_weight)

    monkeypatch.setattr(client_secagg, "_fit_res", spy)
    return seen


def secure_round(config: RunConfig, grid: WireGrid):
    secure = SecureAggregation(grid, coordinator_context(config), config)
    return run_round(
        grid,
        build_strategy(config),
        initial_arrays(config),
        1,
        timeout=30,
        policy=update_policy(config),
        secure=secure,
    )


def test_the_secure_average_equals_fedavg_within_quantization_error(trained_models):
    config = secure_config()
    arrays, record = secure_round(config, make_grid(config))

    assert len(trained_models) == 4 and len(record.clients) == 4 and not record.failures
    weights = {name: n / config.secagg_max_weight for name, (n, _) in trained_models.items()}
    fedavg = [
        sum(n * models[i] for n, models in trained_models.values())
        / sum(n for n, _ in trained_models.values())
        for i in range(len(arrays))
    ]
    # Each client's weighted model is stochastically rounded to a step of 2C/Q; the average
    # divides the summed errors by the summed weights. Slack for float32 and weight rounding.
    step = 2 * config.secagg_clipping_range / config.secagg_quantization_range
    tolerance = len(weights) * step / sum(weights.values()) + 1e-6
    worst = max(
        float(np.abs(array.numpy() - plain).max())
        for array, plain in zip(arrays.values(), fedavg, strict=True)
    )
    assert worst <= tolerance
    assert worst > 0  # quantized, not passed through in clear


def test_the_coordinator_never_receives_a_clients_model(trained_models):
    config = secure_config()
    grid = make_grid(config)
    secure_round(config, grid)

    models = {
        name: np.concatenate([a.ravel() for a in m]) for name, (_, m) in trained_models.items()
    }
    masked_vectors = []
    for reply in grid.received:  # everything the coordinator got: keys, shares, vectors, metrics
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:  # the first array is the quantized weight
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]][1:]
            masked_vectors.append(np.concatenate([a.ravel() for a in arrays]))
    assert len(masked_vectors) == 4
    for vector in masked_vectors:
        assert vector.dtype.kind in "iu"  # integers modulo 2**32, not weights
        for model in models.values():  # uniform masks: nothing of any model shows through
            assert abs(np.corrcoef(vector.astype(float), model)[0, 1]) < 0.1


def test_dp_clients_mask_their_noisy_update_and_report_epsilon(tmp_path):
    config = secure_config(dp=True, **{"run-dir": str(tmp_path), "num-server-rounds": 2})
    grid = make_grid(config)
    recorder = RunRecorder(tmp_path, config)
    run_federation(
        grid,
        build_strategy(config),
        initial_arrays(config),
        num_rounds=2,
        timeout=30,
        policy=update_policy(config),
        on_round=recorder.round_finished,
        secure=SecureAggregation(grid, coordinator_context(config), config),
    )
    recorder.finish()

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    last = metrics["rounds"][-1]
    assert len(last["clients"]) == 4 and last["failed"] == 0
    assert all(0 < client["epsilon"] <= config.target_epsilon for client in last["clients"])
    assert (tmp_path / "checkpoints" / "round-002.safetensors").is_file()
    assert (tmp_path / "model.safetensors").is_file()


def drop_masked_vector_of(dropped: int):
    """A tamper hook: `dropped`'s masked model never reaches the coordinator."""

    def tamper(node: int, message: Message, reply: Message) -> Message | None:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        return None if node == dropped and Key.MASKED_PARAMETERS in configs else reply

    return tamper


def test_a_dropout_within_the_threshold_is_unmasked_around_and_counted():
    config = secure_config()
    _, record = secure_round(config, make_grid(config, tamper=drop_masked_vector_of(12)))

    assert [(failure["id"], failure["stage"]) for failure in record.failures] == [(12, "train")]
    assert len(record.clients) == 4  # it still evaluates the new model
    assert sum("train_examples" in client for client in record.clients) == 3


def test_a_round_with_too_many_dropouts_stops_the_run_loudly():
    config = secure_config(partitioner="iid", **{"num-clients": 2})
    nodes = {node: {"partition-id": node - 1, "num-partitions": 2} for node in (1, 2)}

    with pytest.raises(FederationError, match="secure aggregation halted"):
        secure_round(config, make_grid(config, nodes, tamper=drop_masked_vector_of(2)))


def test_a_client_heavier_than_max_weight_is_refused_by_name():
    config = secure_config(**{"secagg-max-weight": 10})

    with pytest.raises(FederationError, match="secagg-max-weight"):
        secure_round(config, make_grid(config))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"strategy": "krum"}, "strategy 'krum'"),
        ({"max-update-norm": 1.0}, "max-update-norm"),
        ({"client-dp": True}, "client-dp"),
        ({"num-clients": 2000}, "secagg-quantization-range"),
    ],
)
def test_settings_that_need_individual_updates_are_refused(overrides, named):
    with pytest.raises(RunConfigError, match=named):
        secure_config(**overrides)


@pytest.mark.slow
def test_simulate_with_secagg_and_dp_completes_under_flowers_engine(tmp_path):
    """Flower's simulation engine keeps each node's SecAgg+ state between its four messages."""
    result = subprocess.run(
        [sys.executable, "-m", "confide", "simulate", "heart", "--rounds", "2", "--out",
         str(tmp_path), "--quiet", "--set", "secagg=true", "--set", "dp=true"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    assert all("epsilon" in client for client in metrics["rounds"][-1]["clients"])
