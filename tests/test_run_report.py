"""Specifications for a run directory's report: report.md, its plots and clients.csv."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.app import app as client_app
from common.run_config import RunConfig
from server.app import update_policy
from server.federation import evaluate_round, run_federation
from server.run_record import RunRecorder
from server.strategy_choice import build_strategy
from server.tensorboard_export import INSTALL_HINT, export_tensorboard
from tests.local_grid import LocalGrid
from tests.test_federation import HOSPITALS, initial_arrays

PNG = b"\x89PNG"


def run_heart(run_dir: Path, **overrides) -> None:
    """Two real rounds of heart over the in-process grid, recorded as a simulation records them."""
    config = RunConfig.from_mapping(
        {"local-epochs": 1, "num-server-rounds": 2, "run-dir": str(run_dir), **overrides}
    )
    grid = LocalGrid(client_app, config.to_mapping(), HOSPITALS)
    strategy = build_strategy(config)
    arrays = initial_arrays(config)
    recorder = RunRecorder(run_dir, config)
    recorder.initial(evaluate_round(grid, strategy, arrays, 0, timeout=30))
    run_federation(
        grid, strategy, arrays, 2, 30, update_policy(config), on_round=recorder.round_finished
    )
    recorder.finish()


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("heart")
    run_heart(run_dir)
    return run_dir


def test_the_report_shows_every_round_and_links_its_plots(heart_run: Path) -> None:
    report = (heart_run / "report.md").read_text()
    assert report.startswith("# heart: completed")
    assert "| 2 | " in report and "failed replies" in report
    for plot in ("accuracy_loss.png", "client_accuracy.png", "round_time.png"):
        assert f"]({plot})" in report
        assert (heart_run / plot).read_bytes()[:4] == PNG
    assert "epsilon.png" not in report and not (heart_run / "epsilon.png").exists()


def test_clients_csv_has_one_row_per_client_and_round(heart_run: Path) -> None:
    with (heart_run / "clients.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["round"], row["name"]) for row in rows[:4]] == [
        ("1", "cleveland"),
        ("1", "hungary"),
        ("1", "switzerland"),
        ("1", "va-long-beach"),
    ]
    assert len(rows) == 8
    assert all(0 <= float(row["accuracy"]) <= 1 and float(row["train_seconds"]) > 0 for row in rows)
    assert {row["epsilon"] for row in rows} == {""}  # no DP, no epsilon


@pytest.mark.slow
def test_a_private_run_plots_the_epsilon_each_client_spent(tmp_path: Path) -> None:
    settings = {"target-epsilon": 50.0, "noise-multiplier": 1.0, "batch-size": 30}
    run_heart(tmp_path, dp=True, **settings)  # fixed sigma, few steps: seconds, not minutes
    assert "DP-SGD at target epsilon 50" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "epsilon.png").read_bytes()[:4] == PNG
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    # every client that trained, evaluated or not
    assert [len(entry["trained_epsilons"]) for entry in rounds] == [4, 4]
    with (tmp_path / "clients.csv").open() as handle:
        epsilons = [float(row["epsilon"]) for row in csv.DictReader(handle)]
    assert len(epsilons) == 8 and all(0 < value <= 50.0 for value in epsilons)


# `confide` as a user without tensorboard runs it: the package hidden from the import system.
WITHOUT_TENSORBOARD = (
    "import importlib.util as util; find = util.find_spec; "
    "util.find_spec = lambda name, *a: None if name == 'tensorboard' else find(name, *a); "
    "from confide.cli import main; main()"
)


def test_tensorboard_without_the_package_is_a_one_line_error() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORBOARD, "simulate", "heart", "--tensorboard"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {INSTALL_HINT}"


def test_tensorboard_export_holds_each_rounds_metrics(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_heart(tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    export_tensorboard(metrics, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("federated/accuracy")]
    expected = [(r["round"], r["accuracy"]) for r in metrics["rounds"]]
    assert [step for step, _ in accuracy] == [step for step, _ in expected] == [1, 2]
    for (_, got), (_, want) in zip(accuracy, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert "clients/accuracy" in events.Tags()["histograms"]
