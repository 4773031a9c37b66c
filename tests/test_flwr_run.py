"""`flwr run .` from the checkout: Flower's own command runs the same ServerApp and ClientApp as
`confide simulate`, on a local simulation SuperLink, and writes the same run directory.

Flower 1.42 keeps federations in its own configuration (`$FLWR_HOME/config.toml`, where `local` is
a simulation SuperLink that `flwr run` starts and leaves running), not in pyproject.toml: a
`[tool.flwr.federations]` table there is moved by the first `flwr run`, which then comments it out
of pyproject.toml. So the size of the federation is given per run (`--federation-config`). These
tests give Flower a private home and ports, and stop the SuperLink it leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.processes import child_environment, free_port, venv_bin
from common.run_config import PROJECT_ROOT, RunConfig, RunConfigError
from tests.deployment_fixtures import assert_nothing_left, leftovers

pytestmark = pytest.mark.slow

HEART_FEDERATION = ["local", "--federation-config", "num-supernodes=4"]  # heart's 4 hospitals
RUN_TIMEOUT = 300.0

FlwrRun = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def flwr_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlwrRun]:
    """`flwr run . local --stream ARGS` with its own Flower home; the SuperLink it starts on the
    first call serves every test of this module and is stopped (with its children) at the end."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = child_environment(
        {
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            # Otherwise the SuperLink `uv sync`s the app's dependencies into a fresh environment
            # for every run: torch from the index (its CUDA build), not the one installed here.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )

    flwr = [str(venv_bin() / "flwr"), "run", str(PROJECT_ROOT), *HEART_FEDERATION, "--stream"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*flwr, *args],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )

    manifest = (PROJECT_ROOT / "pyproject.toml").read_bytes()
    yield run
    assert (PROJECT_ROOT / "pyproject.toml").read_bytes() == manifest  # Flower migrated nothing
    stop_processes_of(str(home))


def stop_processes_of(marker: str) -> None:
    """Every process whose command line or environment names our Flower home: the SuperLink,
    its SuperExec and any simulation or Ray process a failed run left."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for line in leftovers(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signum)
        deadline = time.monotonic() + 15
        while leftovers(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert_nothing_left(marker)


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def test_flwr_run_writes_the_run_directory_confide_simulate_writes(
    flwr_run: FlwrRun, tmp_path: Path
) -> None:
    by_flower, by_confide = tmp_path / "flwr-run", tmp_path / "confide-simulate"
    result = flwr_run("--run-config", f"num-server-rounds=1 run-dir='{by_flower}'")
    assert "Successfully started run" in result.stdout, output(result)[-3000:]
    simulated = subprocess.run(
        [sys.executable, "-m", "confide", "simulate", "heart", "--rounds", "1", "--out",
         str(by_confide), "--quiet"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr[-2000:]

    assert run_files(by_flower) == run_files(by_confide)
    flower, confide = metrics(by_flower), metrics(by_confide)
    assert flower["status"] == "completed", output(result)[-3000:]
    assert {**flower["config"], "run-dir": ""} == {**confide["config"], "run-dir": ""}
    assert len(flower["rounds"][-1]["clients"]) == 4
    accuracy = flower["rounds"][-1]["accuracy"]
    assert accuracy > flower["initial"]["accuracy"] and accuracy > 0.7
    assert accuracy == pytest.approx(confide["rounds"][-1]["accuracy"], abs=0.05)


def test_flwr_run_with_an_invalid_setting_shows_the_run_config_line(flwr_run: FlwrRun) -> None:
    with pytest.raises(RunConfigError) as expected:
        RunConfig.from_mapping({"num-server-rounds": 0, "seed": -1})
    result = flwr_run("--run-config", "num-server-rounds=0 seed=-1")
    assert str(expected.value) in output(result), output(result)[-3000:]


def test_flwr_run_refuses_an_unknown_setting_before_any_run_starts(flwr_run: FlwrRun) -> None:
    """Flower checks names against pyproject's [tool.flwr.app.config] itself, before the
    ServerApp exists, and does not name the key (`confide simulate --set` does)."""
    result = flwr_run("--run-config", "colour='blue'")
    assert result.returncode != 0
    assert "Invalid run configuration" in output(result)
    assert "Successfully started run" not in output(result)
