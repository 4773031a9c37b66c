"""Specifications for sweeps: lists in a scenario expand into runs, and bad lists fail by name."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.scenario import ScenarioError
from simulations.sweep import expand, plan_sweep

SOURCE = Path("study.toml")


def write_scenario(directory: Path, text: str) -> Path:
    path = directory / "study.toml"
    path.write_text('task = "heart"\nnum-clients = 4\n' + text, encoding="utf-8")
    return path


def test_a_scenario_without_lists_is_one_run_with_no_swept_values() -> None:
    assert expand({"task": "heart", "dirichlet-alpha": 0.5}, SOURCE) == [{}]


def test_two_lists_expand_into_their_cartesian_product_first_key_slowest() -> None:
    settings = {"target-epsilon": [1, 3, 8], "dirichlet-alpha": [0.1, 100], "seed": 7}
    assert expand(settings, SOURCE) == [
        {"target-epsilon": 1, "dirichlet-alpha": 0.1},
        {"target-epsilon": 1, "dirichlet-alpha": 100},
        {"target-epsilon": 3, "dirichlet-alpha": 0.1},
        {"target-epsilon": 3, "dirichlet-alpha": 100},
        {"target-epsilon": 8, "dirichlet-alpha": 0.1},
        {"target-epsilon": 8, "dirichlet-alpha": 100},
    ]


def test_each_run_gets_its_values_and_a_directory_named_by_them(tmp_path: Path) -> None:
    path = write_scenario(
        tmp_path, 'strategy = ["fedavg", "fedmedian"]\nlearning-rate = [0.01, 1]\n'
    )
    runs = plan_sweep(str(path), {}, tmp_path / "out")
    assert [run.label for run in runs] == [
        "strategy=fedavg,learning-rate=0.01",
        "strategy=fedavg,learning-rate=1",
        "strategy=fedmedian,learning-rate=0.01",
        "strategy=fedmedian,learning-rate=1",
    ]
    last = runs[-1].scenario.config
    assert (last.strategy, last.learning_rate) == ("fedmedian", 1.0)
    assert Path(last.run_dir) == tmp_path / "out" / "strategy=fedmedian,learning-rate=1"


def test_a_plain_override_fixes_a_swept_setting(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "seed = [1, 2, 3]\n")
    runs = plan_sweep(str(path), {"seed": 5}, tmp_path)
    assert [(run.values, run.scenario.config.run_dir) for run in runs] == [({}, str(tmp_path))]


def test_every_run_is_checked_before_any_starts(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "dirichlet-alpha = [1.0, -1.0]\n")
    with pytest.raises(ScenarioError, match=r"study\.toml: 'dirichlet-alpha' = -1\.0 is invalid"):
        plan_sweep(str(path), {}, tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("seed = []", r"study\.toml: 'seed' = \[\] sweeps over nothing"),
        ('task = ["heart", "bank"]', r"study\.toml: 'task' cannot be swept \(runs on different data"),
        ('run-dir = ["a", "b"]', r"study\.toml: 'run-dir' cannot be swept"),
        ('seed = [1, "two"]', r"study\.toml: 'seed' = \[1, 'two'\]: a sweep lists plain values of one type"),
        ("seed = [[1, 2], [3]]", r"study\.toml: 'seed' = .*plain values of one type"),
        ("seed = [1, 2, 1]", r"study\.toml: 'seed' lists 1 more than once"),
        ('learning-rate = ["fast", "slow"]', r"study\.toml: 'learning-rate' = 'fast' is a str; expected float"),
    ],
)  # fmt: skip
def test_a_bad_sweep_names_the_file_and_the_key(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "study.toml"
    path.write_text(f"num-clients = 4\n{line}\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=message):
        plan_sweep(str(path), {}, tmp_path)


@pytest.mark.slow
def test_a_sweep_runs_each_point_and_compares_them(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "num-server-rounds = 1\nlocal-epochs = 1\nseed = [0, 1]\n")
    out = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "confide", "simulate", str(path), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("seed=0", "seed=1"):
        assert json.loads((out / name / "metrics.json").read_text())["status"] == "completed"
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["run"], row["seed"], row["status"]) for row in rows] == [
        ("seed=0", "0", "completed"),
        ("seed=1", "1", "completed"),
    ]
    assert all(0 < float(row["final accuracy"]) <= 1 for row in rows)
    assert "| seed=1 | completed |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
    assert "sweep of study" in result.stdout
