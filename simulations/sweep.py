"""Sweeps: a list in a scenario (`target-epsilon = [1, 3, 8]`) becomes one run per value.

Several lists expand into their cartesian product. Each run is an ordinary scenario with its own run
directory under the sweep's, named Hydra-style by its values (`dirichlet-alpha=0.1,target-epsilon=1`),
so a sweep's runs read, resume and report exactly like single runs. Every run is built and checked
before the first one starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.scenario import Scenario, ScenarioError, build_scenario, read_scenario_file

# Comparing runs only makes sense on the same records and model inputs; a run's place on disk and
# whether it resumes belong to the sweep, not to one of its points.
UNSWEEPABLE = {
    "task": "runs on different data do not compare; write one scenario per task",
    "data-file": "runs on different data do not compare; write one scenario per file",
    "schema-file": "runs on different data do not compare; write one scenario per schema",
    "run-dir": "each run of a sweep gets its own directory under --out",
    "resume": "resume one run of a sweep with --resume RUN_DIR",
}
NOT_SETTINGS = ("description", "resources")


@dataclass(frozen=True)
class SweepRun:
    values: dict[str, Any]  # the swept settings of this run, in the file's order
    scenario: Scenario

    @property
    def label(self) -> str:
        return run_name(self.values)


def run_name(values: dict[str, Any]) -> str:
    """A run's name and directory: `dirichlet-alpha=0.1,target-epsilon=1`."""
    return ",".join(f"{key}={format_value(value)}" for key, value in values.items())


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_")


def swept_settings(settings: dict[str, Any], source: Path) -> dict[str, list[Any]]:
    """The settings given as lists, each checked: at least one value, one type, no repeats."""
    swept = {}
    for key, values in settings.items():
        if key in NOT_SETTINGS or not isinstance(values, list):
            continue
        if key in UNSWEEPABLE:
            raise ScenarioError(f"{source}: '{key}' cannot be swept ({UNSWEEPABLE[key]})")
        if not values:
            raise ScenarioError(
                f"{source}: '{key}' = [] sweeps over nothing; list at least one value"
            )
        kinds = {_kind(value) for value in values}
        if len(kinds) > 1 or kinds & {"list", "table"}:
            raise ScenarioError(
                f"{source}: '{key}' = {values!r}: a sweep lists plain values of one type "
                "(numbers, strings or booleans), e.g. [0.1, 1.0, 100]"
            )
        repeated = sorted({format_value(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ScenarioError(f"{source}: '{key}' lists {', '.join(repeated)} more than once")
        swept[key] = values
    return swept


def _kind(value: Any) -> str:
    """Ints and floats mix freely in a sweep of a float setting (`[0.1, 1, 100]`)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return {list: "list", dict: "table"}.get(type(value), type(value).__name__)


def expand(settings: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """The swept values of each run: the cartesian product, first key slowest; [{}] if no lists."""
    swept = swept_settings(settings, source)
    return [
        dict(zip(swept, combination, strict=True))
        for combination in itertools.product(*swept.values())
    ]


def plan_sweep(name_or_path: str, overrides: dict[str, Any], out: Path) -> list[SweepRun]:
    """One checked run per point of the sweep; a scenario without lists is one run in `out`."""
    path, document = read_scenario_file(name_or_path)
    settings = {**document, **overrides}
    points = expand(settings, path)
    runs = []
    for values in points:
        run_dir = out / run_name(values) if values else out
        scenario = build_scenario(path, settings, {**values, "run-dir": str(run_dir)})
        runs.append(SweepRun(values, scenario))
    return runs
