"""`confide simulate` as a user runs it: the real apps under Flower's simulation engine (Ray)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.deployment_fixtures import assert_nothing_left

CONFIDE = [sys.executable, "-m", "confide"]


def confide(
    *args: str, timeout: float = 300, marker: str = "confide-test"
) -> subprocess.CompletedProcess:
    """`marker` goes into the environment, which every process it starts (Ray's too) inherits:
    tests/deployment_fixtures.py `assert_nothing_left` finds them by it, whatever else runs."""
    return subprocess.run(
        [*CONFIDE, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "CONFIDE_TEST_MARKER": marker},
    )  # fmt: skip


@pytest.mark.slow
def test_simulate_heart_trains_and_writes_the_run_directory(tmp_path):
    marker = f"confide-test-{uuid.uuid4().hex}"
    result = confide(
        "simulate", "heart", "--rounds", "2", "--out", str(tmp_path), "--quiet", marker=marker
    )
    assert result.returncode == 0, result.stderr[-2000:]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    rounds = metrics["rounds"]
    assert [entry["round"] for entry in rounds] == [1, 2]
    assert rounds[-1]["accuracy"] > metrics["initial"]["accuracy"]
    assert len(rounds[-1]["clients"]) == 4
    for name in ("model.safetensors", "accuracy_loss.png", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert_nothing_left(marker)  # Ray's head, raylet and workers included


def write_user_file(path: Path) -> None:
    """A small site file whose label depends on two features, split across three sites."""
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["site", "age", "smoker", "outcome"])
        for i in range(240):
            age = rng.normal(55, 10)
            smoker = rng.choice(["yes", "no"])
            risk = (age - 55) / 10 + (1.5 if smoker == "yes" else -1.5) + rng.normal(0, 0.5)
            writer.writerow([f"site-{i % 3}", f"{age:.1f}", smoker, "sick" if risk > 0 else "well"])


@pytest.mark.slow
def test_simulate_on_a_users_own_file_and_schema(tmp_path):
    data = tmp_path / "records.csv"
    write_user_file(data)
    schema = tmp_path / "records.schema.toml"
    inferred = confide(
        "schema", "infer", str(data), "--label", "outcome", "--out", str(schema),
        "--ignore", "site", "--list-categories",  # the site is how records are split, not a feature
    )  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr
    typed = schema.read_text().replace("center = 0.0\nscale = 1.0", "center = 55.0\nscale = 10.0")
    schema.write_text(typed)  # the operator types the reference values infer leaves out
    out = tmp_path / "run"
    result = confide(
        "simulate",
        "--data", str(data),
        "--schema", str(schema),
        "--partition", "column:site",
        "--clients", "3",
        "--rounds", "3",
        "--out", str(out),
        "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {c["name"] for c in metrics["rounds"][-1]["clients"]} == {"site-0", "site-1", "site-2"}
    assert metrics["rounds"][-1]["accuracy"] > 0.8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "nowhere"], "scenario 'nowhere'; presets: bank, bank-1000, banking77"),
        (["simulate", "heart", "--set", "colour=blue"], "unknown setting 'colour'; valid settings"),
        (["simulate", "heart", "--rounds", "0"], "'num-server-rounds' = 0 is invalid"),
        (["simulate", "heart", "--set", "strategy=magic"], "one of fedavg, fedprox, fedadam"),
        (["simulate", "heart", "--set", "fraction-train=1.5"], "a number in (0, 1]"),
        (["simulate", "bank", "--clients", "30000"], "needs at least 60000 records"),
        (["simulate", "heart", "--clients", "7"], "set num-clients=4"),
        (["simulate", "heart", "--partition", "zigzag"], "use iid, dirichlet:ALPHA"),
        (["simulate", "heart", "--set", "seed=[]"], "'seed' = [] sweeps over nothing"),
        (["simulate", "heart", "--set", "dropout-fraction=1.5"], "a number in [0, 1]"),
        (
            ["simulate", "banking77-private", "--set", "lora-targets=attn.qkv"],
            "'lora-targets' names 'attn.qkv', not a Linear in a block",
        ),
    ],
)
def test_bad_input_is_one_clear_line_before_anything_starts(args, message):
    result = confide(*args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_data_file_that_breaks_the_schema_lists_every_problem(tmp_path):
    data = tmp_path / "records.csv"
    write_user_file(data)
    schema = tmp_path / "schema.toml"
    inferred = ["--label", "outcome", "--out", str(schema), "--list-categories"]
    assert confide("schema", "infer", str(data), *inferred).returncode == 0
    lines = data.read_text().splitlines()
    lines[5] = "site-1,old,yes,sick"
    lines[9] = "site-2,50.0,no,unknown-outcome"
    data.write_text("\n".join(lines) + "\n")
    result = confide("simulate", "--data", str(data), "--schema", str(schema), "--quiet")
    assert result.returncode == 2
    assert "row 6, column 'age'" in result.stderr and "'old'" in result.stderr
    assert "unknown-outcome" in result.stderr


@pytest.mark.slow
def test_a_dp_simulation_keeps_every_client_within_its_budget(tmp_path):
    result = confide(
        "simulate", "heart", "--rounds", "2", "--out", str(tmp_path), "--quiet",
        "--set", "dp=true", "--set", "target-epsilon=1.0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    for entry in rounds:
        assert len(entry["clients"]) == 4 and entry["failed"] == 0
        for client in entry["clients"]:
            assert 0 < client["epsilon"] <= 1.0 and client["delta"] == 1e-5
    assert 0.9 < rounds[-1]["epsilon_max"] <= 1.0  # calibrated for 2 rounds: the budget is used
    ledgers = sorted((tmp_path / "privacy-ledgers").glob("*.json"))
    assert len(ledgers) == 4
    shown = confide("privacy", str(ledgers[0]))
    assert shown.returncode == 0 and "of 1" in shown.stdout  # budget left "x of 1"
