"""What leaves a site is the same function of neighbouring data sets, up to the noise.

A fuzzer of hostile messages (hypothesis) drives the real ClientApp through the harness in
tests/neighbouring_worlds.py: weights with NaN, Inf, 1e30, denormals, wrong dtypes or shapes;
every run-config key the site reads, at its extremes; train and evaluation; DP-SGD modes; a
site that answered before and one that never did. Each message is answered on D and on a
neighbour D' (a record added, removed or replaced by an adversarial one), and any difference
beyond the noise fails. The auditor's attacks follow as named regression tests.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.nan_predicate import crafted_state, features
from client import site_inputs
from client.local_data import load_local_split
from common import hf_model
from common.federated_model import build_federated_model
from common.hf_model import MODELS_DIR_ENV
from common.lora import federated_state
from common.privacy import suggest_delta
from common.privacy_ledger import PrivacyLedger
from common.run_config import RunConfig
from common.site_policy import SitePolicy
from common.tasks import DATA_DIR, task_schema
from tests.deployment_fixtures import write_site
from tests.neighbouring_worlds import (
    NEIGHBOURS,
    ExactCount,
    HostileMessage,
    RecordingNoise,
    Site,
    answer,
    compare_worlds,
    neighbour_files,
    reply_content,
    write_rows,
)
from tests.test_hf_model import save_tiny_bert

FUZZED_MESSAGES = 1000
SMALL_MODEL = {"model-width": 8, "model-depth": 1, "model-heads": 2, "dp": True}
# Values a coordinator may send for each key the site reads: typical, extreme, out of range.
EXTREMES = {
    "batch-size": [1, 3, 16, 46, 10_000, 2**20, 2**20 + 1, 0],
    "local-epochs": [1, 2, 0, 101],
    "physical-batch-size": [1, 4, 64],
    "num-server-rounds": [1, 3, 10_000, 10_001],
    "target-epsilon": [1e-9, 0.5, 3.0, 1000.0],
    "target-delta": [1e-12, 1e-5, 0.5],
    "noise-multiplier": [0.0, 0.01, 0.5, 4.0, 1e6],
    "max-grad-norm": [1e-6, 1.0, 1e6],
    "test-fraction": [0.001, 0.5, 0.999],
    "holdout": ["test", "validation"],
    "seed": [0, 7, 2**62],
    "example-count": ["private", "exact"],
    "training-metrics": ["off", "exact"],
    "dp-mode": ["auto", "hooks", "ghost"],
    "dp-optimizer": ["adam", "sgd"],
    "accountant": ["prv", "rdp"],
    "task": ["heart", "custom", "bank"],
    "schema-file": ["", "/etc/passwd", "secret.toml"],
    "data-file": ["", "/etc/shadow"],
    "init-checkpoint": ["", "../../x.safetensors", "clinc150-text.safetensors"],
    "lora-rank": [0, 1],
    "dp": [True, False],
    "site-policy": ["", "/etc/passwd"],
    "no-such-key": [1],
}
# RDP: the fuzzer's plans change with every message, and PRV takes seconds to calibrate each;
# the default (PRV) policy has its own cases below.
POLICIES = ["accountant = 'rdp'\n", "accountant = 'rdp'\nevaluation = 'off'\n",
            "accountant = 'rdp'\nexample-count = 'exact'\n"]  # fmt: skip


@pytest.fixture(autouse=True)
def coordinator_identity():
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


@pytest.fixture(scope="module")
def heart_rows(tmp_path_factory):
    path = write_site(tmp_path_factory.mktemp("site") / "switzerland.csv", "switzerland")
    with path.open() as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def site_weights(run_config: dict) -> dict[str, torch.Tensor]:
    """The site's own model for a valid config (the heart task's, for an invalid one)."""
    torch.manual_seed(0)
    try:
        config = RunConfig.from_mapping(run_config)
        return federated_state(build_federated_model(task_schema(config), config))
    except Exception:  # a config the site will refuse: send it the heart model anyway
        config = RunConfig.from_mapping(SMALL_MODEL)
        return federated_state(build_federated_model(task_schema(config), config))


def tampered(weights: dict[str, torch.Tensor], how: str, where: int) -> dict | None:
    """The weights as a hostile coordinator may send them."""
    if how == "none":
        return None
    weights = {name: tensor.clone() for name, tensor in weights.items()}
    name = sorted(weights)[where % len(weights)]
    flat = weights[name].view(-1)
    position = where % max(len(flat), 1)
    special = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30, "tiny": 1e-40,
               "bound": 1e4}  # fmt: skip
    if how in special and len(flat):
        flat[position] = special[how]
    elif how == "amplified":  # finite, within the bound: overflow must come from the records
        weights = {n: t * 1e3 for n, t in weights.items()}
    elif how == "float64":
        weights[name] = weights[name].double()
    elif how == "shape":
        weights[name] = torch.zeros(len(flat) + 1)
    elif how == "missing":
        del weights[name]
    elif how == "extra":
        weights["stolen.weight"] = torch.zeros(3)
    return weights


ADVERSARIAL_RECORDS = st.fixed_dictionaries(
    {
        "age": st.sampled_from(["29", "77", "1e6", "-40", "0"]),
        "trestbps": st.sampled_from(["0", "120", "300"]),
        "chol": st.sampled_from(["0", "600", "1e5"]),
        "thalach": st.sampled_from(["60", "202", "1e4"]),
        "oldpeak": st.sampled_from(["0", "-3", "6.2", "1e3"]),
        "sex": st.sampled_from(["0", "1", "9"]),  # 9: a category the schema never lists
        "cp": st.sampled_from(["1", "4", "7"]),
        "fbs": st.sampled_from(["0", "1"]),
        "restecg": st.sampled_from(["0", "2", "5"]),
        "exang": st.sampled_from(["0", "1"]),
        "disease": st.sampled_from(["0", "1"]),
    }
)


def fuzzed(examples: int) -> settings:
    """Hypothesis at a fixed count of examples, the same ones every run (CI repeats itself)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def worlds(
    directory: Path, site_file: tuple[list[str], list[list[str]]], neighbour: str,
    record: list[str], policy: str = "", earlier_count: int | None = None,
) -> tuple[Site, Site]:  # fmt: skip
    """A site holding D and one holding its neighbour D', at one path in turn."""
    header, rows = site_file
    d, d_prime = neighbour_files(directory, header, rows, neighbour, record)
    home = directory / "home"
    return (
        Site(d, directory / "home-d", home, policy, earlier_count),
        Site(d_prime, directory / "home-d-prime", home, policy, earlier_count),
    )


def assert_neighbours_answer_alike(
    directory: Path, site_file: tuple[list[str], list[list[str]]], case: tuple,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    message, neighbour, record, policy, earlier_count = case
    world, twin = worlds(directory, site_file, neighbour, record, policy, earlier_count)
    differences = compare_worlds(message, world, twin, neighbour == "replace", monkeypatch)
    assert not differences, differences


@st.composite
def hostile_messages(draw) -> tuple[HostileMessage, str, dict, str, bool]:
    keys = draw(st.lists(st.sampled_from(sorted(EXTREMES)), max_size=4, unique=True))
    run_config = {**SMALL_MODEL, **{k: draw(st.sampled_from(EXTREMES[k])) for k in keys}}
    how = draw(
        st.sampled_from(["valid"] * 6 + ["nan", "inf", "huge", "tiny", "bound", "amplified",
                         "float64", "shape", "missing", "extra", "none"])
    )  # fmt: skip
    weights = tampered(site_weights(run_config), how, draw(st.integers(0, 10_000)))
    message = HostileMessage(
        kind=draw(st.sampled_from(["train", "train", "evaluate"])),
        run_config=run_config,
        weights=weights,
        server_round=draw(st.sampled_from([1, 1, 0, 3, -1, 2**40, "x"])),
        run_id=draw(st.integers(1, 3)),
    )
    neighbour = draw(st.sampled_from(NEIGHBOURS))
    record = draw(ADVERSARIAL_RECORDS)
    policy = draw(st.sampled_from(POLICIES))
    earlier_count = draw(st.sampled_from([None] + [30] * 19))  # mostly sites that answered before
    return message, neighbour, record, policy, earlier_count


@fuzzed(FUZZED_MESSAGES)
@given(case=hostile_messages())
def test_hostile_messages_get_the_same_reply_from_neighbouring_data_sets(
    tmp_path_factory, heart_rows, monkeypatch, case
):
    message, neighbour, record, policy, earlier_count = case
    if "exact" in policy and neighbour != "replace":
        return  # exact counts: the site accounts for replace-one neighbours only
    case = (message, neighbour, heart_row(record, heart_rows), policy, earlier_count)
    assert_neighbours_answer_alike(tmp_path_factory.mktemp("worlds"), heart_rows, case, monkeypatch)


# ------------------------------------------------------------------ the auditor's attacks


def heart_row(record: dict[str, str], heart_rows: tuple) -> list[str]:
    return [record[column] for column in heart_rows[0]]


OLD_PATIENT = {"age": "77", "trestbps": "120", "chol": "240", "thalach": "150", "oldpeak": "1",
               "sex": "1", "cp": "4", "fbs": "0", "restecg": "0", "exang": "0", "disease": "1"}  # fmt: skip


def age_above(threshold: float, run_config: dict) -> dict[str, torch.Tensor]:
    """The auditor's weights: logits NaN exactly for records older than `threshold`."""
    config = RunConfig.from_mapping(run_config)
    schema = task_schema(config)
    (age,) = [f for f in features(schema) if f.name == "age"]
    encoded = (threshold - schema.numeric[age.column].center) / schema.numeric[age.column].scale
    return crafted_state(site_weights(run_config), age, encoded)


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_non_finite_weights_are_refused_before_a_record_is_read(tmp_path, kind, monkeypatch):
    weights = tampered(site_weights(SMALL_MODEL), "nan", 3)
    site = Site(tmp_path / "never-read.csv", tmp_path / "home-d", tmp_path / "home")
    reply = answer(HostileMessage(kind, SMALL_MODEL, weights), site, RecordingNoise(), monkeypatch)
    assert (
        reply.error.reason == "site: refused: the received model holds a value that is not finite"
    )
    assert not (tmp_path / "home-d" / "ledger.json").exists()  # nothing charged


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_weights_that_overflow_on_chosen_records_mark_none_of_them(
    tmp_path, heart_rows, kind, monkeypatch
):
    """The NaN predicate, with the site's weight bound lifted so the crafted model gets in: a
    record that makes its loss or gradient NaN contributes zero, and the replies on a site with
    and without a 77-year-old are the same up to the noise (the oldest otherwise is 74)."""
    monkeypatch.setattr(site_inputs, "MAX_RECEIVED_WEIGHT", float("inf"))
    weights = age_above(75.5, SMALL_MODEL)
    message = HostileMessage(kind, {**SMALL_MODEL, "batch-size": 64}, weights)
    world, twin = worlds(tmp_path, heart_rows, "remove", heart_row(OLD_PATIENT, heart_rows))
    assert not compare_worlds(message, world, twin, False, monkeypatch)


def test_a_batch_above_the_sites_size_is_answered_without_its_size(
    tmp_path, heart_rows, monkeypatch
):
    message = HostileMessage(
        "train", {**SMALL_MODEL, "batch-size": 100_000}, site_weights(SMALL_MODEL)
    )
    world, twin = worlds(tmp_path, heart_rows, "add", heart_row(OLD_PATIENT, heart_rows))
    assert not compare_worlds(message, world, twin, False, monkeypatch)


def test_the_runs_test_fraction_and_seed_do_not_choose_the_sites_test_records(tmp_path):
    data = write_site(tmp_path / "switzerland.csv", "switzerland")
    node = {"data-path": str(data), "name": "site", "ledger-path": str(tmp_path / "ledger.json")}
    chosen = [
        load_local_split(RunConfig.from_mapping(settings), node, SitePolicy()).test.labels
        for settings in ({}, {"test-fraction": 0.001, "seed": 41}, {"test-fraction": 0.999})
    ]
    assert all(len(test) == len(chosen[0]) and (test == chosen[0]).all() for test in chosen)
    assert 0 < len(chosen[0]) < 46


def test_a_first_run_cannot_fix_the_sites_delta(tmp_path, heart_rows, monkeypatch):
    """A delta the site derives from its count, released once: the run's split and batch size
    do not enter it, so a first run asking for test-fraction 0.999 and batch 1 fixes nothing."""
    budgets = []
    for number, asked in enumerate(({}, {"test-fraction": 0.999, "batch-size": 1})):
        header, rows = heart_rows
        data = write_rows(tmp_path / f"site-{number}.csv", header, rows)
        site = Site(data, tmp_path / f"home-{number}", tmp_path / "home")
        message = HostileMessage("train", {**SMALL_MODEL, **asked}, site_weights(SMALL_MODEL))
        answer(message, site, ExactCount(), monkeypatch)
        ledger = PrivacyLedger.open(site.state / "ledger.json", "site")
        budgets.append((ledger.stored_budget(), ledger.released_count()))
    assert budgets[0] == budgets[1]
    assert budgets[0][0].target_delta == suggest_delta(budgets[0][1])


def test_a_schema_file_the_coordinator_names_is_never_opened(tmp_path, heart_rows, monkeypatch):
    planted = tmp_path / "secret.toml"
    planted.write_text('api_key = "hunter2"\n')
    replies = []
    for schema_file in (str(planted), str(tmp_path / "missing.toml"), str(tmp_path)):
        run_config = {**SMALL_MODEL, "task": "custom", "schema-file": schema_file, "data-file": "x"}
        site = Site(tmp_path / "never-read.csv", tmp_path / "home-d", tmp_path / "home")
        message = HostileMessage("train", run_config, site_weights(SMALL_MODEL))
        replies.append(reply_content(answer(message, site, RecordingNoise(), monkeypatch)))
    assert replies[0] == replies[1] == replies[2]
    assert replies[0][2] == (
        "site: refused: the run is a custom task, and this site joined without a schema of its "
        "own (confide join --schema)"
    )


@pytest.mark.parametrize("neighbour", NEIGHBOURS)
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_the_default_policy_answers_neighbours_alike(
    tmp_path, heart_rows, kind, neighbour, monkeypatch
):
    """The strict built-in policy (PRV accounting), on a site that never answered before."""
    message = HostileMessage(kind, SMALL_MODEL, site_weights(SMALL_MODEL))
    record = {**OLD_PATIENT, "sex": "9", "chol": "1e5"}  # an unlisted category, an extreme value
    world, twin = worlds(tmp_path, heart_rows, neighbour, heart_row(record, heart_rows))
    assert not compare_worlds(message, world, twin, neighbour == "replace", monkeypatch)


# ------------------------------------------------------------------ text: LoRA and Hugging Face

TEXT_MESSAGES = 200
TEXT_MODEL = {"task": "banking77", "model-width": 8, "model-depth": 1, "model-heads": 2,
              "max-length": 16, "vocab-size": 512, "dp": True}  # fmt: skip
TEXT_MODELS = [
    {},
    {"lora-rank": 4},
    {"model": "hf:tiny-bert", "lora-rank": 4,
     "lora-targets": "attention.self.query,attention.self.value"},
]  # fmt: skip
TEXT_EXTREMES = {k: EXTREMES[k] for k in ("batch-size", "local-epochs", "noise-multiplier",
                 "test-fraction", "target-epsilon", "seed")} | {
    "dp-token-embedding": ["frozen", "trained"], "lora-rank": [0, 4, 5000],
    "max-length": [1, 16, 9000], "model": ["builtin", "hf:tiny-bert", "hf:../../etc"],
}  # fmt: skip
MESSAGES = ["", "card " * 2000, "my card was lost", "💳 ✓ \u202e", "nan inf 1e308", 'a,b\n"c']


@pytest.fixture(scope="module")
def text_site(tmp_path_factory):
    """Thirty of BANKING77's messages as a bank's file, and a tiny BERT installed at the site."""
    directory = tmp_path_factory.mktemp("text")
    with (DATA_DIR / "banking77" / "train.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    save_tiny_bert(directory / "models" / "tiny-bert")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_DIR_ENV, str(directory / "models"))
        for cached in (hf_model.hf_tokenizer, hf_model.hf_digest):
            cached.cache_clear()
        yield header, rows[:30]
        for cached in (hf_model.hf_tokenizer, hf_model.hf_digest):
            cached.cache_clear()


@st.composite
def hostile_text_messages(draw) -> tuple[HostileMessage, str, list[str], str, int | None]:
    keys = draw(st.lists(st.sampled_from(sorted(TEXT_EXTREMES)), max_size=3, unique=True))
    run_config = {**TEXT_MODEL, **draw(st.sampled_from(TEXT_MODELS))}
    run_config |= {k: draw(st.sampled_from(TEXT_EXTREMES[k])) for k in keys}
    how = draw(st.sampled_from(["valid"] * 6 + ["nan", "huge", "float64", "shape", "extra"]))
    weights = tampered(site_weights(run_config), how, draw(st.integers(0, 10_000)))
    message = HostileMessage(draw(st.sampled_from(["train", "evaluate"])), run_config, weights)
    record = [draw(st.sampled_from(MESSAGES)), draw(st.sampled_from(["card_arrival", "age_limit"]))]
    earlier_count = draw(st.sampled_from([None, 20, 20, 20]))
    return message, draw(st.sampled_from(NEIGHBOURS)), record, POLICIES[0], earlier_count


@fuzzed(TEXT_MESSAGES)
@given(case=hostile_text_messages())
def test_hostile_messages_to_a_text_site_get_the_same_reply_from_neighbours(
    tmp_path_factory, text_site, monkeypatch, case
):
    assert_neighbours_answer_alike(tmp_path_factory.mktemp("worlds"), text_site, case, monkeypatch)
