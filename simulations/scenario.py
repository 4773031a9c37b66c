"""Scenarios: TOML files that name a task, how it is split, and how the federation trains.

Every key of a scenario is a run-config key (the same names as `pyproject.toml` and `--set`), plus an
optional `[resources]` table for the simulation engine. A scenario is checked whole before anything
starts, so a typo costs a second, not a half-finished run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.run_config import RunConfig, RunConfigError
from common.site_policy import PolicyError, load_policy
from simulations.engine import Resources

SCENARIO_DIR = Path(__file__).parent / "scenarios"
RESOURCE_KEYS = {
    "cpus-per-client": "cpus_per_client",
    "gpus-per-client": "gpus_per_client",
    "ray-address": "ray_address",
}


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    config: RunConfig
    resources: Resources


def preset_names() -> list[str]:
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def resolve_scenario_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ScenarioError(f"{path}: no such scenario file")
        return path
    preset = SCENARIO_DIR / f"{name_or_path}.toml"
    if not preset.is_file():
        raise ScenarioError(
            f"unknown scenario '{name_or_path}'; presets: {', '.join(preset_names())} "
            "(or pass a path to your own scenario .toml)"
        )
    return preset


def load_scenario(name_or_path: str, overrides: dict[str, Any] | None = None) -> Scenario:
    path, document = read_scenario_file(name_or_path)
    return build_scenario(path, document, overrides)


def read_scenario_file(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The file's TOML as written, before any check: sweeps look at it before it becomes runs."""
    path = resolve_scenario_path(name_or_path)
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{path}: not valid TOML ({error}); fix the file") from None


def build_scenario(
    path: Path, document: dict[str, Any], overrides: dict[str, Any] | None = None
) -> Scenario:
    """One checked scenario from a file's settings, with `overrides` taking precedence."""
    settings = {**document, **(overrides or {})}
    settings.update(_site_policy_path(path, document, overrides or {}))
    description = settings.pop("description", "")
    resources = _resources(settings.pop("resources", {}), path)
    try:
        config = RunConfig.from_mapping(settings, source=str(path))
    except RunConfigError as error:
        raise ScenarioError(str(error)) from None
    if config.site_policy:  # every site's table checked before anything starts
        try:
            load_policy(Path(config.site_policy))
        except PolicyError as error:
            raise ScenarioError(str(error)) from None
    return Scenario(path.stem, str(description), config, resources)


def _site_policy_path(
    path: Path, document: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, str]:
    """A policy named in a scenario file is found beside it; one from --set, from here."""
    if isinstance(overrides.get("site-policy"), str) and overrides["site-policy"]:
        return {"site-policy": str(Path(overrides["site-policy"]).resolve())}
    if isinstance(document.get("site-policy"), str) and document["site-policy"]:
        return {"site-policy": str((path.parent / document["site-policy"]).resolve())}
    return {}


def _resources(table: Any, path: Path) -> Resources:
    if not isinstance(table, dict):
        raise ScenarioError(f"{path}: [resources] must be a table")
    unknown = sorted(set(table) - set(RESOURCE_KEYS))
    if unknown:
        raise ScenarioError(
            f"{path}: unknown key resources.{unknown[0]}; valid: {', '.join(RESOURCE_KEYS)}"
        )
    values: dict[str, Any] = {}
    for key, attr in RESOURCE_KEYS.items():
        if key in table:
            value = table[key]
            if key == "ray-address":
                if not isinstance(value, str):
                    raise ScenarioError(f"{path}: resources.{key} = {value!r} must be HOST:PORT")
                values[attr] = value
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ScenarioError(f"{path}: resources.{key} = {value!r} must be a number")
            values[attr] = float(value)
    resources = Resources(**values)
    try:
        resources.check_fits(str(path))
    except ValueError as error:
        raise ScenarioError(str(error)) from None
    return resources
