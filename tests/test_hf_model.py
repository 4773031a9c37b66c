"""A site's own Hugging Face encoder from local disk: DP-LoRA on it, with exact per-sample
gradients, only adapters and head travelling, every side holding the same copy, and every bad
checkpoint refused at start naming the path and the fix. Tiny models are built here with
`transformers`' config classes: nothing is downloaded."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flwr.app import ArrayRecord, ConfigRecord
from transformers import BertConfig, BertModel, BertTokenizerFast, T5Config, T5Model

import client.app as client_app_module
from common import hf_model, tasks
from common.federated_model import build_federated_model, federated_layout, initial_federated_state
from common.hf_model import MODELS_DIR_ENV, HFModelError, pin_hf_model
from common.lora import LoraConfigError
from common.run_config import RunConfig, RunConfigError
from common.site_policy import REFUSED
from common.tasks import task_schema
from server.coordinator.coordinator import CoordinatorError
from server.coordinator.coordinator_run import RunRequest, run_config_for
from server.federation import outgoing
from server.strategy_choice import build_strategy
from server.update_validation import UpdatePolicy, screen_update
from tests.deployment_fixtures import assert_nothing_left
from tests.local_grid import LocalGrid
from tests.test_models import BATCH, assert_per_sample_grads_match_loop
from tests.test_simulate_cli import confide

WORDS = "my card was lost stolen i need a new one transfer money to account balance top up".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
HF_LORA = {
    "task": "banking77",
    "partitioner": "dirichlet",
    "num-clients": 10,
    "model": "hf:tiny-bert",
    "lora-rank": 4,
    "lora-targets": "attention.self.query,attention.self.value",
    "max-length": 16,
}
PRIVATE = {**HF_LORA, "dp": True, "target-epsilon": 8.0, "batch-size": 128, "num-server-rounds": 1}

transformers.utils.logging.disable_progress_bar()  # saving a model would draw one
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def save_tiny_bert(directory: Path, vocab: list[str] = VOCAB, hidden: int = 16) -> None:
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(directory)
    settings = BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(settings).save_pretrained(directory)


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models directory holding `tiny-bert`, and no cached copy of any earlier one."""
    models = tmp_path / "models"
    save_tiny_bert(models / "tiny-bert")
    monkeypatch.setenv(MODELS_DIR_ENV, str(models))
    for cached in (hf_model.hf_tokenizer, hf_model.hf_digest, tasks._load_task):
        cached.cache_clear()
    yield models
    for cached in (hf_model.hf_tokenizer, hf_model.hf_digest, tasks._load_task):
        cached.cache_clear()


def config_of(**settings: object) -> RunConfig:
    return RunConfig.from_mapping({**HF_LORA, **settings})


def send_train(config: RunConfig, arrays: ArrayRecord):
    grid = LocalGrid(client_app_module.app, config.to_mapping(), {1: {"partition-id": 0}})
    messages = build_strategy(config).configure_train(1, arrays, ConfigRecord(), grid)
    (reply,) = grid.send_and_receive(outgoing(messages, arrays, grid, timeout=60))
    return reply


def test_per_sample_grads_of_adapters_and_head_match_a_single_example_loop(models_dir) -> None:
    config = config_of()
    model = build_federated_model(task_schema(config), config)
    for name, parameter in model.named_parameters():
        if name.endswith("lora_b.weight"):  # zero at the start: make A's gradients non-trivial
            torch.nn.init.normal_(parameter, std=0.1)
    ids = torch.randint(5, len(VOCAB), (BATCH, 8))
    mask = torch.ones(BATCH, 8, dtype=torch.bool)
    mask[1, 5:] = mask[3, 2:] = False
    assert_per_sample_grads_match_loop(model, (ids, mask))


def test_the_base_is_the_checkpoint_on_disk_and_only_adapters_and_head_travel(models_dir) -> None:
    config = config_of()
    model = build_federated_model(task_schema(config), config)
    saved = BertModel.from_pretrained(models_dir / "tiny-bert").state_dict()
    encoder = model.encoder.state_dict()
    assert torch.equal(
        encoder["embeddings.word_embeddings.weight"], saved["embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        encoder["encoder.layer.1.attention.self.query.base.weight"],
        saved["encoder.layer.1.attention.self.query.weight"],
    )
    travels = initial_federated_state(task_schema(config), config)
    assert set(travels) == set(federated_layout(task_schema(config), config))
    assert {name.rsplit(".", 2)[-2] for name in travels} == {"lora_a", "lora_b", "head"}
    assert len(travels) == 2 * 2 * 2 + 2  # 2 targets x (A, B) x 2 layers, head weight and bias


def test_the_site_tokenizes_its_records_with_the_checkpoint_s_tokenizer(models_dir) -> None:
    config = config_of()
    ids, mask = tasks.load_task(config).dataset.inputs[:2]
    tokenizer = BertTokenizerFast.from_pretrained(models_dir / "tiny-bert")
    first = tasks.load_task(config).rows[0]["text"]
    expected = tokenizer(first, padding="max_length", truncation=True, max_length=16)
    assert ids.shape[1] == 16 and ids[0].tolist() == expected["input_ids"]
    assert mask[0].tolist() == [bool(m) for m in expected["attention_mask"]]


def test_a_private_round_trains_the_adapters_through_the_real_client_app(
    models_dir, tmp_path
) -> None:
    config = RunConfig.from_mapping({**PRIVATE, "run-dir": str(tmp_path)})
    arrays = ArrayRecord(initial_federated_state(task_schema(config), config))
    reply = send_train(config, arrays)
    assert not reply.has_error(), reply.error.reason
    assert screen_update(reply, arrays, UpdatePolicy(0.0, "reject", 10**6)) is None
    sent = reply.content["arrays"]  # unpacked by the screening, by the global model's layout
    assert set(sent) == set(arrays)
    moved = [n for n in sent if not np.array_equal(sent[n].numpy(), arrays[n].numpy())]
    assert set(moved) == set(arrays)  # DP-SGD noise moves every trainable tensor
    (ledger,) = (tmp_path / "privacy-ledgers").glob("*.json")
    assert json.loads(ledger.read_text())  # charged to the site's ledger


def test_a_site_whose_copy_differs_from_the_coordinator_s_refuses_before_any_charge(
    models_dir, tmp_path
) -> None:
    config = pin_hf_model(RunConfig.from_mapping({**PRIVATE, "run-dir": str(tmp_path)}))
    assert (
        config.model.startswith("hf:tiny-bert@") and len(config.model) == len("hf:tiny-bert@") + 64
    )
    arrays = ArrayRecord(initial_federated_state(task_schema(config), config))
    torch.manual_seed(1)  # the site's copy: the same architecture, other weights
    BertModel(BertModel.from_pretrained(models_dir / "tiny-bert").config).save_pretrained(
        models_dir / "tiny-bert"
    )
    hf_model.hf_digest.cache_clear()
    hf_model.hf_tokenizer.cache_clear()
    reply = send_train(config, arrays)
    assert reply.has_error() and reply.error.code == REFUSED, reply.error.reason
    assert "is not the coordinator's" in reply.error.reason
    assert not list((tmp_path / "privacy-ledgers").glob("*.json"))


def break_checkpoint(directory: Path, how: str) -> None:
    if how == "no weights":
        (directory / "model.safetensors").unlink()
    elif how == "pickled weights":
        (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "vocab.txt"):
            (directory / name).unlink(missing_ok=True)
    elif how == "another model's tokenizer":
        BertTokenizerFast(vocab={f"w{i}": i for i in range(200)}, unk_token="w1").save_pretrained(
            directory
        )
    elif how == "weights of another size":
        settings = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**settings, "hidden_size": 32}))
    elif how == "encoder-decoder":
        for name in ("config.json", "model.safetensors"):
            (directory / name).unlink()
        T5Model(
            T5Config(vocab_size=len(VOCAB), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
        ).save_pretrained(directory)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no weights", r"is incomplete, missing model\.safetensors \(pytorch_model\.bin is not read"),
        ("pickled weights", r"missing model\.safetensors \(pytorch_model\.bin is not read: pickle runs code\)"),
        ("no tokenizer", r"is incomplete, missing a tokenizer \(tokenizer\.json or vocab\.txt"),
        ("another model's tokenizer", rf"its tokenizer has 2\d\d tokens but the model embeds {len(VOCAB)}: they belong to different checkpoints"),
        ("weights of another size", r"cannot be loaded|does not fit its config\.json"),
        ("encoder-decoder", r"t5 is not an encoder with layers; use an encoder checkpoint"),
    ],
)  # fmt: skip
def test_a_bad_checkpoint_is_refused_at_start_naming_the_path_and_the_fix(
    models_dir, how: str, message: str
) -> None:
    break_checkpoint(models_dir / "tiny-bert", how)
    config = config_of()
    with pytest.raises(HFModelError, match=message) as refused:
        build_federated_model(task_schema(config), config)
    assert "model 'hf:tiny-bert'" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"model": "hf:missing"}, HFModelError, r"model 'hf:missing': no directory .*missing; install it with `model\.save_pretrained"),
        ({"model": "hf:../tiny-bert"}, HFModelError, r"give the name of a directory in the models directory .*not a path"),
        ({"model": "hf:/etc"}, HFModelError, r"not a path"),
        ({"lora-rank": 0}, RunConfigError, r"trains LoRA adapters on its own frozen weights: set lora-rank >= 1"),
        ({"lora-rank": 17}, LoraConfigError, r"'lora-rank' = 17 exceeds attention\.self\.query's smaller dimension \(16 x 16\)"),
        ({"lora-targets": "attn.query"}, LoraConfigError, r"names 'attn\.query', not a Linear in a block; use a comma list of attention\.self\.query"),
        ({"model": "huggingface"}, RunConfigError, r"'model' = 'huggingface' is invalid; use 'builtin' or 'hf:NAME'"),
    ],
)  # fmt: skip
def test_bad_model_settings_are_refused_at_start_naming_the_setting(
    models_dir, settings: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        config = config_of(**settings)
        build_federated_model(task_schema(config), config)


def test_a_tabular_task_cannot_take_a_text_encoder(models_dir) -> None:
    config = RunConfig.from_mapping({"task": "heart", "model": "hf:tiny-bert", "lora-rank": 2})
    with pytest.raises(HFModelError, match=r"task 'heart' is tabular .* set model = 'builtin'"):
        build_federated_model(task_schema(config), config)


def test_a_coordinator_run_pins_the_model_and_refuses_a_missing_one(models_dir, tmp_path) -> None:
    request = RunRequest(tmp_path, tmp_path / "run", overrides=dict(HF_LORA))
    pinned = run_config_for(request, 2)
    assert pinned.model == f"hf:tiny-bert@{hf_model.hf_digest('tiny-bert')}"
    missing = RunRequest(tmp_path, tmp_path / "run", overrides={**HF_LORA, "model": "hf:nope"})
    with pytest.raises(CoordinatorError, match=r"model 'hf:nope': no directory"):
        run_config_for(missing, 2)


@pytest.mark.slow
def test_confide_simulate_federates_a_hugging_face_model_under_dp(models_dir, tmp_path) -> None:
    """The real command, Flower's simulation engine and Ray workers, which find the model
    through the environment like any site process."""
    out, marker = tmp_path / "run", f"confide-test-{uuid.uuid4().hex}"
    settings = {**PRIVATE, "num-clients": 3, "num-server-rounds": 2, "batch-size": 64}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    sets = [arg.replace("=True", "=true") for arg in sets]
    done = confide("simulate", "banking77", *sets, "--out", str(out), "--quiet", marker=marker)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(not r["failures"] for r in metrics["rounds"])
    assert 0 < metrics["rounds"][-1]["epsilon_max"] <= 8.0
    assert_nothing_left(marker)
