"""DP-LoRA: adapters and head train under DP-SGD with exact per-sample gradients, only they
travel, and the frozen base every side rebuilds itself never changes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

import client.app as client_app_module
from common.federated_model import build_federated_model, initial_federated_state
from common.lora import LoraConfigError, add_lora, federated_state, load_federated_state
from common.model_factory import build_model
from common.pretrained_checkpoint import CHECKPOINT_DIR, initial_state
from common.run_config import RunConfig, RunConfigError
from common.site_policy import REFUSED
from common.tasks import load_central_test, task_schema
from server.app import central_evaluation, update_policy
from server.coordinator.coordinator import CoordinatorError
from server.coordinator.coordinator_run import RunRequest, run_config_for
from server.federation import outgoing, run_round
from server.secure_aggregation import SecureAggregation
from server.strategy_choice import build_strategy
from server.update_validation import UpdatePolicy, screen_update
from tests.local_grid import LocalGrid
from tests.test_models import assert_per_sample_grads_match_loop, text_batch, text_model
from tests.test_secure_aggregation import WireGrid, coordinator_context

SHIPPED = "clinc150-text.safetensors"  # made for banking77 at model-width 64, max-length 32
BANKING77 = {"task": "banking77", "max-length": 32, "model-width": 64}
BANKS = {"partitioner": "dirichlet", "dirichlet-alpha": 1.0, "num-clients": 10}
PRIVATE_LORA = {
    **BANKING77,
    **BANKS,
    "init-checkpoint": SHIPPED,
    "lora-rank": 4,
    "dp": True,
    "target-epsilon": 8.0,
    "batch-size": 128,
    "local-epochs": 1,
    "num-server-rounds": 1,
}
BASE_CONFIG = RunConfig.from_mapping(PRIVATE_LORA)  # the honest run's adapters, as sent
ADAPTED = 6  # attn.query, key, value, proj, mlp.fc, proj: the default lora-targets

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def config_of(**settings: object) -> RunConfig:
    return RunConfig.from_mapping({k.replace("_", "-"): v for k, v in settings.items()})


def test_lora_per_sample_grads_match_single_example_loop() -> None:
    model = add_lora(text_model(), config_of(task="banking77", lora_rank=3))
    for name, parameter in model.named_parameters():
        if name.endswith("lora_b.weight"):  # zero at the start: make A's gradients non-trivial
            torch.nn.init.normal_(parameter, std=0.1)
    assert_per_sample_grads_match_loop(model, text_batch())


def test_only_adapters_and_head_train() -> None:
    model = add_lora(text_model(), config_of(task="banking77", lora_rank=2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(federated_state(model))
    assert len(trainable) == 2 * ADAPTED * model.config.depth + 2  # A and B per layer, head


def test_a_lora_model_starts_as_its_base() -> None:
    """B starts at zero, so the pretrained encoder is what the first round fine-tunes."""
    base = text_model()
    adapted = add_lora(text_model(), config_of(task="banking77", lora_rank=4))
    inputs = text_batch()
    torch.testing.assert_close(adapted(*inputs), base(*inputs))


def test_every_side_rebuilds_the_same_frozen_base_whatever_its_random_state() -> None:
    """Without init-checkpoint the base is the seeded fresh initialisation, not the process's."""
    config = config_of(**BANKING77, lora_rank=4)
    schema = task_schema(config)
    torch.manual_seed(1)
    one = build_federated_model(schema, config).state_dict()
    torch.manual_seed(2)
    other = build_federated_model(schema, config).state_dict()
    assert all(torch.equal(one[name], other[name]) for name in one)


def test_lora_off_federates_every_tensor_as_before() -> None:
    config = config_of(**BANKING77)
    schema = task_schema(config)
    torch.manual_seed(0)
    before = initial_state(schema, config)
    torch.manual_seed(0)
    now = initial_federated_state(schema, config)
    assert list(now) == list(build_model(schema, config).state_dict())
    assert all(torch.equal(now[name], before[name]) for name in before)


def test_loading_is_strict_about_names_and_shapes_with_lora_or_without() -> None:
    for config in (config_of(**BANKING77), config_of(**BANKING77, lora_rank=4)):
        schema = task_schema(config)
        model, other = build_federated_model(schema, config), build_federated_model(schema, config)
        received = {name: torch.randn_like(t) for name, t in federated_state(other).items()}
        load_federated_state(model, received)
        assert all(torch.equal(federated_state(model)[n], t) for n, t in received.items())
        name = next(iter(received))
        with pytest.raises(RuntimeError, match=r"missing \['"):
            load_federated_state(model, {n: t for n, t in received.items() if n != name})
        with pytest.raises(RuntimeError, match=r"extra \['stray'\]"):
            load_federated_state(model, {**received, "stray": torch.zeros(1)})
        with pytest.raises(RuntimeError, match=f"received '{name}' has shape"):
            load_federated_state(model, {**received, name: torch.zeros(1, 2, 3)})


def test_the_federated_tensors_are_the_models_own_after_one_is_replaced() -> None:
    """The places found once per model stay right when a tensor object is swapped, as
    `to(device)` does, and when add_lora swaps modules after the model was read once."""
    model = text_model()
    assert list(federated_state(model)) == list(model.state_dict())
    model.head.weight = torch.nn.Parameter(torch.zeros_like(model.head.weight))
    received = {name: torch.randn_like(t) for name, t in federated_state(model).items()}
    load_federated_state(model, received)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in received.items())
    assert federated_state(model)["head.weight"].data_ptr() == model.head.weight.data_ptr()
    adapted = add_lora(model, config_of(task="banking77", lora_rank=2))
    assert set(federated_state(adapted)) == {
        name for name, p in adapted.named_parameters() if p.requires_grad
    }


def test_a_private_round_sends_only_adapters_and_head_and_leaves_the_base_frozen(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp, packed on the wire, screened as the coordinator screens."""
    config = RunConfig.from_mapping({**PRIVATE_LORA, "run-dir": str(tmp_path)})
    schema = task_schema(config)
    built = []

    def recorded(*args: object) -> torch.nn.Module:
        built.append(build_federated_model(*args))
        return built[-1]

    monkeypatch.setattr(client_app_module, "build_federated_model", recorded)
    grid = LocalGrid(client_app_module.app, config.to_mapping(), {1: {"partition-id": 0}})
    arrays = ArrayRecord(initial_federated_state(schema, config))
    messages = build_strategy(config).configure_train(1, arrays, ConfigRecord(), grid)
    (reply,) = grid.send_and_receive(outgoing(messages, arrays, grid, timeout=60))
    assert not reply.has_error(), reply.error.reason

    assert screen_update(reply, arrays, UpdatePolicy(0.0, "reject", 10**6)) is None
    sent = reply.content["arrays"]  # unpacked by the screening, by the global model's layout
    assert list(sent) == list(arrays)
    assert len(sent) == 2 * ADAPTED * config.model_depth + 2
    trained, fresh = built[-1].state_dict(), build_federated_model(schema, config).state_dict()
    frozen = set(fresh) - set(arrays)
    assert frozen and all(torch.equal(trained[name], fresh[name]) for name in frozen)
    moved = [name for name in sent if not np.array_equal(sent[name].numpy(), arrays[name].numpy())]
    assert set(moved) == set(arrays)  # DP-SGD noise moves every trainable tensor


def test_the_coordinator_evaluates_adapters_and_head_on_the_base_it_rebuilt() -> None:
    """Round 0 with LoRA is the model LoRA off starts from: B is zero, the head seeded alike."""
    config = config_of(**BANKING77, init_checkpoint=SHIPPED, lora_rank=4)
    schema, test_set = task_schema(config), load_central_test(config)
    adapted = central_evaluation(config, test_set)(
        ArrayRecord(initial_federated_state(schema, config))
    )
    plain_config = dataclasses.replace(config, lora_rank=0)
    torch.manual_seed(config.seed)  # as the ServerApp seeds before its initial model
    plain_state = ArrayRecord(initial_state(schema, plain_config))
    plain = central_evaluation(plain_config, test_set)(plain_state)
    assert adapted == pytest.approx(plain)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora-rank": -1}, r"'lora-rank' = -1 is invalid; use 0 \(LoRA off\) or a rank from 1 to 4096"),
        ({"lora-alpha": 0.0}, r"'lora-alpha' = 0.0 is invalid"),
        ({"lora-rank": 65}, r"'lora-rank' = 65 exceeds attn.query's smaller dimension \(64 x 64\); use a rank from 1 to 64"),
        ({"lora-rank": 4, "lora-targets": "attn.qkv"}, r"'lora-targets' names 'attn.qkv', not a Linear in a block; use a comma list of attn.query, attn.key"),
        ({"lora-rank": 4, "lora-targets": " , "}, r"'lora-targets' is empty"),
        ({"lora-rank": 4, "dp-token-embedding": "trained"}, r"LoRA freezes every tensor but its adapters and the head; set dp-token-embedding = 'frozen'"),
        ({"lora-rank": 4, "task": "heart"}, r"task 'heart' is tabular .*; set lora-rank = 0"),
    ],
)  # fmt: skip
def test_bad_lora_settings_are_refused_at_start_naming_the_setting(settings, message) -> None:
    with pytest.raises(RunConfigError, match=message):
        config = RunConfig.from_mapping({**BANKING77, **settings})
        initial_federated_state(task_schema(config), config)


def test_every_bad_lora_target_is_listed_at_once() -> None:
    config = config_of(**BANKING77, lora_rank=65, lora_targets="attn.qkv,mlp.fc")
    with pytest.raises(LoraConfigError, match=r"'attn.qkv'.*; .*exceeds mlp.fc's"):
        initial_federated_state(task_schema(config), config)


def test_secure_aggregation_masks_and_sums_only_adapters_and_head(tmp_path) -> None:
    config = RunConfig.from_mapping({**PRIVATE_LORA, "secagg": True, "run-dir": str(tmp_path)})
    banks = {10 + i: {"partition-id": i} for i in range(3)}
    grid = WireGrid(client_app_module.app, config.to_mapping(), banks)
    arrays = ArrayRecord(initial_federated_state(task_schema(config), config))
    secure = SecureAggregation(grid, coordinator_context(config), config)
    summed, record = run_round(
        grid, build_strategy(config), arrays, 1, timeout=60, policy=update_policy(config),
        secure=secure,
    )  # fmt: skip
    assert len(record.clients) == 3 and not record.failures
    assert list(summed) == list(arrays)


def test_a_coordinator_run_refuses_bad_lora_settings_before_it_is_submitted(tmp_path) -> None:
    request = RunRequest(tmp_path, tmp_path / "run", overrides={**BANKING77, "lora-rank": 65})
    with pytest.raises(CoordinatorError, match=r"'lora-rank' = 65 exceeds attn\.query's"):
        run_config_for(request, 2)


def test_a_site_refuses_a_lora_base_that_is_not_shipped(tmp_path) -> None:
    """A coordinator naming any other file (here a copy of the shipped one) gets a refusal that
    says nothing of the site's disk, and the site charges nothing."""
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes((CHECKPOINT_DIR / SHIPPED).read_bytes())
    for named in (str(copy), f"../checkpoints/{SHIPPED}", "missing.safetensors"):
        config = RunConfig.from_mapping(
            {**PRIVATE_LORA, "init-checkpoint": named, "run-dir": str(tmp_path)}
        )
        grid = LocalGrid(client_app_module.app, config.to_mapping(), {1: {"partition-id": 0}})
        arrays = ArrayRecord(initial_federated_state(task_schema(BASE_CONFIG), BASE_CONFIG))
        messages = build_strategy(config).configure_train(1, arrays, ConfigRecord(), grid)
        (reply,) = grid.send_and_receive(outgoing(messages, arrays, grid, timeout=60))
        assert reply.has_error() and reply.error.code == REFUSED, reply.error.reason
        assert f"must name a checkpoint shipped in {CHECKPOINT_DIR}" in reply.error.reason
        assert not list((tmp_path / "privacy-ledgers").glob("*.json"))
