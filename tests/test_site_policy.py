"""A site's policy file: read strictly, every problem named at once, and checked against a run's
request before any record is read."""

from __future__ import annotations

import tomllib
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from common.run_config import RunConfig
from common.site_policy import (
    PolicyError,
    PolicyRefusal,
    SitePolicy,
    check_request,
    load_policy,
    policy_from_mapping,
    policy_toml,
)
from confide.cli import app
from tests.deployment_fixtures import write_site


def write(tmp_path, text: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_no_file_means_the_strict_defaults():
    policy = load_policy(None)
    assert policy.require_dp and policy.max_epsilon == 3.0
    assert (policy.evaluation, policy.training_metrics, policy.example_count) == (
        "private",
        "off",
        "private",
    )
    assert policy.neighbours == "add-remove"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("max-epsilon = 3\nmax-epsilom = 4\n", "unknown key 'max-epsilom'"),
        ('max-epsilon = "3"\n', "'max-epsilon' = '3' is a str"),
        ("require-dp = 1\n", "'require-dp' = 1 is a int"),
        ("max-epsilon = 0\n", "'max-epsilon' = 0 is invalid"),
        ("max-epsilon = -1.5\n", "'max-epsilon' = -1.5 is invalid"),
        ("delta = 1.0\n", "'delta' = 1.0 is invalid"),
        ('evaluation = "exact"\n', "'evaluation' = 'exact' is invalid; use one of private, off"),
        ("max-epsilon = nan\n", "'max-epsilon' = nan is invalid"),
        ("[sites.bank-1]\nmax-epsilon = -2\n", "[sites.bank-1]: 'max-epsilon' = -2 is invalid"),
    ],
)
def test_a_bad_policy_file_is_refused_naming_the_file_and_key(tmp_path, text, named):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(path) in str(error.value)
    assert named in str(error.value)


def test_every_problem_is_listed_at_once(tmp_path):
    path = write(tmp_path, 'max-epsilon = 0\nevaluation = "loud"\n')
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    message = str(error.value)
    assert "'max-epsilon' = 0" in message and "'evaluation' = 'loud'" in message


def test_a_missing_or_broken_file_says_so(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "absent.toml")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(write(tmp_path, "max-epsilon = = 3"))


@pytest.mark.parametrize(
    ("delta", "records", "fix"),
    [
        (1e-3, 1000, "at least 1/n"),  # delta * n = 1: publishing a record is allowed
        (9e-4, 1000, r"above 1/\(10 n\)"),  # delta * n = 0.9
    ],
)
def test_delta_must_be_well_below_one_over_n(delta, records, fix):
    policy = SitePolicy(delta=delta)
    with pytest.raises(PolicyRefusal, match=fix):
        policy.check_delta(records)


def test_a_large_delta_needs_an_explicit_yes_and_never_reaches_one_over_n():
    SitePolicy(delta=9e-4, allow_large_delta=True).check_delta(1000)
    with pytest.raises(PolicyRefusal):
        SitePolicy(delta=1e-3, allow_large_delta=True).check_delta(1000)


def test_an_automatic_delta_is_a_power_of_ten_at_most_one_over_ten_n():
    policy = SitePolicy()
    assert policy.delta_for(261) == pytest.approx(1e-4)
    assert policy.delta_for(1000) == pytest.approx(1e-4)
    assert policy.delta_for(1001) == pytest.approx(1e-5)
    policy.check_delta(261)


def test_a_simulated_site_takes_its_own_table(tmp_path):
    path = write(tmp_path, "max-epsilon = 3\n[sites.cleveland]\nmax-epsilon = 1\n")
    assert load_policy(path, site="cleveland").max_epsilon == 1.0
    assert load_policy(path, site="hungary").max_epsilon == 3.0


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "max-epsilon = 3\nrequire-dp = true\n")
    policy = load_policy(path, {"max-epsilon": 1.5, "require-dp": False})
    assert (policy.max_epsilon, policy.require_dp) == (1.5, False)
    assert "command-line flags" in policy.source


def test_the_written_policy_reads_back_the_same():
    policy = SitePolicy(max_epsilon=2.5, delta=1e-6, tasks=("heart",), example_count="exact")
    again = policy_from_mapping(tomllib.loads(policy_toml(policy)), "again")
    assert again == replace(policy, source="again")


def request(**settings) -> RunConfig:
    return RunConfig.from_mapping({"dp": True, **settings})


@pytest.mark.parametrize(
    ("settings", "field", "asked"),
    [
        ({"dp": False}, "require-dp = true", "dp = false"),
        ({"target-epsilon": 1000.0}, "max-epsilon = 3", "target-epsilon = 1000"),
        ({"noise-multiplier": 0.01}, "min-noise-multiplier = 0.5", "noise-multiplier = 0.01"),
        ({"example-count": "exact"}, "example-count = 'private'", "example-count = 'exact'"),
        ({"training-metrics": "exact"}, "training-metrics = 'off'", "training-metrics = 'exact'"),
        ({"task": "bank"}, "tasks = ['heart']", "task 'bank'"),
    ],
)
def test_a_request_below_the_policy_is_refused_naming_field_and_request(settings, field, asked):
    policy = SitePolicy(tasks=("heart",))
    with pytest.raises(PolicyRefusal) as refusal:
        check_request(policy, request(**settings))
    assert "refused by site policy" in str(refusal.value)
    assert field in str(refusal.value) and asked in str(refusal.value)


def test_a_request_within_the_policy_passes():
    check_request(SitePolicy(), request(**{"target-epsilon": 3.0}))
    check_request(SitePolicy(require_dp=False), request(dp=False))
    check_request(SitePolicy(example_count="exact"), request(**{"example-count": "exact"}))


def join(tmp_path, *options: str):
    data = write_site(tmp_path / "switzerland.csv", "switzerland")
    args = ["join", "--role", "hospital", "--data", str(data), "--coordinator", "127.0.0.1:9",
            "--insecure", "--work-dir", str(tmp_path / "node"), *options]  # fmt: skip
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(
    ("text", "options", "named"),
    [
        ("max-epsilon = 1\nepsilon = 2\n", [], "unknown key 'epsilon'"),
        ('max-epsilon = "one"\n', [], "'max-epsilon' = 'one' is a str"),
        ("max-epsilon = 0\n", [], "'max-epsilon' = 0 is invalid"),
        ("delta = 0.5\n", [], "delta = 0.5 is at least 1/n"),
        ("", ["--delta", "0.05"], "delta = 0.05 is at least 1/n"),
        ("", ["--delta", "0.02"], "delta = 0.02 is above 1/(10 n)"),
        ("", ["--max-epsilon", "-1"], "'max-epsilon' = -1.0 is invalid"),
    ],
)
def test_join_refuses_a_bad_policy_naming_it_and_starts_nothing(tmp_path, text, options, named):
    policy = write(tmp_path, text)
    result = join(tmp_path, "--policy", str(policy), *options)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert named in message and str(policy) in message
    assert not (tmp_path / "node").exists()
