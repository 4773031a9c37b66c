"""A hostile coordinator against a site's policy: the real ClientApp on a real site's file.

The in-process tests hand the coordinator's messages straight to the ClientApp (tests/local_grid.py),
as a SuperNode would; the slow test sends the same requests through a TLS coordinator behind
nginx to two joined sites with the strict default policy.
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.local_data import _file_sha256, _load_site_file
from common.evaluation import evaluate
from common.model_factory import build_model
from common.partition import site_holdout, site_split
from common.privacy_ledger import PrivacyLedger, summarize
from common.run_config import RunConfig
from common.site_data import load_site_data
from common.site_policy import SitePolicy
from common.tasks import task_schema
from server.federation import evaluate_round, split_replies
from server.strategy_choice import build_strategy
from tests.deployment_fixtures import Background, running_federation, wait_for, write_site
from tests.local_grid import LocalGrid

SITE = "switzerland"
NODE = 7
SPLIT_SECRET = 12345  # the games below know the site's split: the attacker's best case
TEST_FRACTION = SitePolicy().test_fraction


def site_node(tmp_path, data, policy: str | None = None, ledger: str = "ledger.json") -> dict:
    node = {"data-path": str(data), "name": SITE, "ledger-path": str(tmp_path / ledger)}
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        node["policy-path"] = str(tmp_path / "policy.toml")
    return node


def initial_arrays(config: RunConfig) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(task_schema(config), config).state_dict())


def train_failures(config: RunConfig, node: dict, run_id: int = 1) -> list[dict]:
    grid = LocalGrid(client_app, config.to_mapping(), {NODE: node})
    TaskIdentity.run_id = run_id  # the messages' run
    strategy = build_strategy(config)
    messages = strategy.configure_train(1, initial_arrays(config), ConfigRecord(), grid)
    _, failures = split_replies(grid.send_and_receive(messages))
    return failures


HOSTILE_REQUESTS = {
    "dp off": ({"dp": False}, "require-dp = true, but the run asks dp = false"),
    "a budget above the site's": (
        {"dp": True, "target-epsilon": 1000.0},
        "max-epsilon = 3, but the run asks target-epsilon = 1000",
    ),
    "almost no noise": (
        {"dp": True, "noise-multiplier": 0.01},
        "min-noise-multiplier = 0.5, but the run asks noise-multiplier = 0.01",
    ),
    "exact counts": (
        {"dp": True, "example-count": "exact"},
        "example-count = 'private', but the run asks example-count = 'exact'",
    ),
    "training metrics": (
        {"dp": True, "training-metrics": "exact"},
        "training-metrics = 'off', but the run asks training-metrics = 'exact'",
    ),
}


@pytest.mark.parametrize("request_name", list(HOSTILE_REQUESTS))
def test_a_hostile_request_is_refused_before_any_record_is_read(tmp_path, request_name):
    settings, named = HOSTILE_REQUESTS[request_name]
    config = RunConfig.from_mapping({**settings, "run-dir": str(tmp_path)})
    missing = tmp_path / "not-read.csv"  # were it read, the refusal would be a file error
    (failure,) = train_failures(config, site_node(tmp_path, missing))
    assert failure["refused"] is True
    assert failure["reason"].startswith(f"{SITE}: refused by site policy (built-in defaults): ")
    assert named in failure["reason"]
    assert not (tmp_path / "ledger.json").exists()


def test_a_site_policy_file_it_cannot_use_refuses_every_run(tmp_path):
    config = RunConfig.from_mapping({"dp": True, "run-dir": str(tmp_path)})
    node = site_node(tmp_path, tmp_path / "not-read.csv", policy="max-epsilon = -1\n")
    (failure,) = train_failures(config, node)
    assert "'max-epsilon' = -1 is invalid" in failure["reason"] and failure["refused"]


def test_under_dp_only_noised_and_charged_numbers_leave_the_site(tmp_path):
    data = write_site(tmp_path / f"{SITE}.csv", SITE)
    config = RunConfig.from_mapping(
        {"dp": True, "batch-size": 10, "local-epochs": 1, "num-server-rounds": 2,
         "target-epsilon": 3.0, "run-dir": str(tmp_path)}
    )  # fmt: skip
    grid = LocalGrid(client_app, config.to_mapping(), {NODE: site_node(tmp_path, data)})
    strategy = build_strategy(config)
    arrays = initial_arrays(config)
    counts = []
    for server_round in (1, 2):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        (reply,) = grid.send_and_receive(messages)
        metrics = dict(reply.content["metrics"])
        assert set(metrics) == {
            "num-examples", "client-weight", "noise-multiplier", "epsilon-round", "epsilon",
            "delta",
        }  # fmt: skip
        counts.append(metrics["num-examples"])
    assert counts[0] == counts[1]  # released once, then repeated: no second look at the count
    evaluated = evaluate_round(grid, strategy, arrays, 2, timeout=60)
    assert not evaluated.failures
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", SITE)
    purposes = [entry.purpose for entry in ledger.entries()]
    assert purposes == ["count", "train", "train", "evaluate"]
    assert "sha256" in (summarize(tmp_path / "ledger.json")[0].source)


def test_appending_records_keeps_what_was_spent(tmp_path):
    data = write_site(tmp_path / f"{SITE}.csv", SITE)
    config = RunConfig.from_mapping(
        {"dp": True, "batch-size": 10, "local-epochs": 1, "num-server-rounds": 1,
         "target-epsilon": 1.0, "run-dir": str(tmp_path)}
    )  # fmt: skip
    node = site_node(tmp_path, data)
    assert not train_failures(config, node)
    first = summarize(tmp_path / "ledger.json")
    with data.open() as handle:
        rows = list(csv.reader(handle))
    with data.open("a", newline="") as handle:
        csv.writer(handle).writerows(rows[1:4])  # three more records
    _load_site_file.cache_clear()
    _file_sha256.cache_clear()
    train_failures(config, node, run_id=2)  # a new run on the grown file
    after = summarize(tmp_path / "ledger.json")
    assert {run.fingerprint for run in after} == {SITE}  # one data set, not a fresh one
    assert [run.run_id for run in after] == ["1", "2"]
    assert after[-1].epsilon > first[-1].epsilon  # the new run's spend adds to the old
    assert after[-1].epsilon <= 1.0
    assert after[-1].source != first[-1].source  # the file's new hash is on record


def flipped_world(tmp_path, config: RunConfig) -> tuple:
    """Two files that differ in one test record's label, and that record's position."""
    world = write_site(tmp_path / "world-a.csv", SITE)
    with world.open() as handle:
        header, *rows = list(csv.reader(handle))
    _, test = site_holdout(len(rows), TEST_FRACTION, "test", SPLIT_SECRET)
    target = int(test[0])
    label = header.index("disease")
    rows[target][label] = "1" if rows[target][label] == "0" else "0"
    flipped = tmp_path / "world-b.csv"
    with flipped.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return world, flipped


def distinguishing_game(tmp_path, config: RunConfig, policy: str | None, trials: int) -> float:
    """The coordinator sends one model for evaluation until the site stops answering, then guesses
    which of two worlds (one test label flipped) the site holds. It knows everything else: the
    exact correct count of its model in each world."""
    worlds = flipped_world(tmp_path, config)
    arrays = initial_arrays(config)
    model = build_model(task_schema(config), config)
    model.load_state_dict(arrays.to_torch_state_dict())
    exact = []
    for world in worlds:
        dataset = load_site_data(
            world, task_schema(config), vocab_size=config.vocab_size, max_length=config.max_length
        )
        test = site_split(dataset, SITE, TEST_FRACTION, "test", SPLIT_SECRET).test
        result = evaluate(model, test, 256, torch.device("cpu"))
        exact.append(result.accuracy * result.num_examples)
    assert abs(exact[0] - exact[1]) == pytest.approx(1.0)
    rng = random.Random(1)
    wins = 0
    for trial in range(trials):
        truth = rng.randrange(2)
        node = site_node(tmp_path, worlds[truth], policy, ledger=f"ledger-{trial}.json")
        (tmp_path / f"ledger-{trial}.split-secret").write_text(f"{SPLIT_SECRET}\n")
        grid = LocalGrid(client_app, config.to_mapping(), {NODE: node})
        strategy = build_strategy(config)
        answers = []
        for server_round in range(config.num_server_rounds + 3):  # more than planned
            record = evaluate_round(grid, strategy, arrays, server_round, timeout=60)
            if record.failures:
                assert record.failures[0]["refused"]
                break
            (client,) = record.clients
            answers.append(client["accuracy"] * client["num_examples"])
        guess = int(abs(np.mean(answers) - exact[1]) < abs(np.mean(answers) - exact[0]))
        wins += guess == truth
    return wins / trials


def test_exact_evaluation_replies_give_a_record_away(tmp_path):
    """The attack has power: against exact replies (a site that allows runs without DP) it
    always wins, so its failure below is the mechanism's doing."""
    config = RunConfig.from_mapping({"dp": False, "num-server-rounds": 2, "run-dir": str(tmp_path)})
    assert distinguishing_game(tmp_path, config, "require-dp = false\n", trials=20) == 1.0


def test_under_the_default_policy_the_attack_stays_within_what_epsilon_allows(tmp_path):
    config = RunConfig.from_mapping(
        {"dp": True, "num-server-rounds": 2, "target-epsilon": 1.0, "batch-size": 10,
         "run-dir": str(tmp_path)}
    )  # fmt: skip
    trials = 120
    success = distinguishing_game(tmp_path, config, "max-epsilon = 1.0\n", trials)
    spent = summarize(tmp_path / "ledger-0.json")[-1]
    epsilon = spent.split["evaluate"]  # the replies are all the coordinator saw
    assert 0 < epsilon <= 1.0
    bound = math.exp(epsilon) / (1 + math.exp(epsilon))
    assert success <= bound + 3 * math.sqrt(bound * (1 - bound) / trials), (success, epsilon)
    entries = PrivacyLedger.open(tmp_path / "ledger-0.json", SITE).entries()
    evaluations = [entry for entry in entries if entry.purpose == "evaluate"]
    assert len(evaluations) == config.num_server_rounds + 1  # then it stopped answering


@pytest.mark.slow
def test_a_hostile_coordinator_is_refused_by_joined_sites(tmp_path):
    """Over TLS, two sites with the strict default policy: a run without DP and a run asking for
    epsilon 1000 are both refused at once, the reasons in metrics.json and on each site's
    `confide join` console; the sites stay up."""
    with running_federation(tmp_path, site_policy="") as fed:
        for number, settings in enumerate((["dp=false"], ["dp=true", "target-epsilon=1000"])):
            out = tmp_path / f"run-{number}"
            sets = [item for setting in settings for item in ("--set", setting)]
            run = Background(
                ["coordinator", "run", "--state", str(fed.state), "--rounds", "1", *sets,
                 "--set", "round-retries=0", "--out", str(out), "--quiet",
                 "--wait-timeout", "120"],
                tmp_path / f"run-{number}.log",
            )  # fmt: skip
            try:
                assert run.wait(timeout=600) != 0, run.output()[-2000:]
            finally:
                run.stop()
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["status"] == "failed" and not metrics["rounds"]
            initial = metrics["initial"]  # round 0's evaluation, declined by both sites
            assert initial["refused"] == 2
            expected = "require-dp = true" if number == 0 else "max-epsilon = 3"
            assert all(expected in failure["reason"] for failure in initial["failures"])
            assert expected in metrics["error"]
            for name, site in fed.sites.items():  # and on each site's `confide join` console
                policy = fed.root / "nodes" / name / "site-policy.toml"
                told = f"refusal: refused by site policy ({policy}): {expected}, but the run asks"
                wait_for(lambda site=site, told=told: told in site.output(), 10, told)
        assert all(site.alive() for site in fed.sites.values())


def test_a_simulation_rehearses_each_sites_policy(tmp_path):
    """One policy file for the virtual sites, one of them stricter: it refuses, the rest train."""
    policy = tmp_path / "policy.toml"
    policy.write_text("require-dp = false\n[sites.cleveland]\nrequire-dp = true\n")
    config = RunConfig.from_mapping(
        {"site-policy": str(policy), "local-epochs": 1, "run-dir": str(tmp_path)}
    )
    nodes = {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    grid = LocalGrid(client_app, config.to_mapping(), nodes)
    strategy = build_strategy(config)
    messages = strategy.configure_train(1, initial_arrays(config), ConfigRecord(), grid)
    trained, failures = split_replies(grid.send_and_receive(messages))
    assert len(trained) == 3
    (refusal,) = failures
    assert refusal["reason"].startswith("cleveland: refused by site policy")
    assert "[sites.cleveland]): require-dp = true" in refusal["reason"]
