"""Specifications for simulations.scenario: presets, user scenario files, resources and errors.

Nothing here starts a simulation; scenarios are only loaded and checked.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from common.partition import MIN_RECORDS_PER_CLIENT, partition_plan
from common.run_config import RunConfig
from simulations.scenario import (
    SCENARIO_DIR,
    Scenario,
    ScenarioError,
    load_scenario,
    preset_names,
    resolve_scenario_path,
)

PRESETS = preset_names()


def write_scenario(directory: Path, text: str, name: str = "my-study.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def scenario_error(path: Path | str) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(path))
    return str(info.value)


# ----------------------------------------------------------------------------------- presets


def test_presets_are_the_toml_files_in_the_scenario_directory() -> None:
    assert PRESETS == sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    assert {"heart", "bank", "banking77", "medical-text"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_with_the_values_its_file_sets(name: str) -> None:
    scenario = load_scenario(name)
    document = tomllib.loads((SCENARIO_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    assert scenario.name == name
    assert scenario.description == document.pop("description")
    settings = scenario.config.to_mapping()
    for key, value in document.items():
        assert settings[key] == value, key


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_can_be_split_into_its_clients(name: str) -> None:
    config = load_scenario(name).config
    names, parts = partition_plan(config)
    assert len(names) == len(parts) == config.num_clients
    assert min(len(part) for part in parts) >= MIN_RECORDS_PER_CLIENT


def test_preset_without_resources_gives_each_client_one_cpu_and_no_gpu() -> None:
    resources = load_scenario("heart").resources
    assert (resources.cpus_per_client, resources.gpus_per_client) == (1.0, 0.0)


def test_overrides_win_over_the_scenario_file() -> None:
    scenario = load_scenario("heart", {"num-server-rounds": 2, "learning-rate": 0.1})
    assert scenario.config.num_server_rounds == 2
    assert scenario.config.learning_rate == 0.1
    assert scenario.config.task == "heart"


def test_unknown_scenario_name_lists_the_presets() -> None:
    message = scenario_error("hearts")
    assert "'hearts'" in message
    for name in PRESETS:
        assert name in message


# ------------------------------------------------------------------------------ user files


def test_user_scenario_file_loads_by_path(tmp_path: Path) -> None:
    path = write_scenario(
        tmp_path,
        'description = "quick check"\n'
        'task = "heart"\n'
        'partitioner = "iid"\n'
        "num-clients = 3\n"
        "learning-rate = 1\n"
        "\n"
        "[resources]\n"
        "cpus-per-client = 1\n"
        "gpus-per-client = 0.25\n",
    )
    scenario = load_scenario(str(path))
    assert isinstance(scenario, Scenario)
    assert scenario.name == "my-study"
    assert scenario.description == "quick check"
    assert scenario.config == RunConfig.from_mapping(
        {"task": "heart", "partitioner": "iid", "num-clients": 3, "learning-rate": 1.0}
    )
    assert (scenario.resources.cpus_per_client, scenario.resources.gpus_per_client) == (1.0, 0.25)


def test_settings_a_user_file_leaves_out_take_the_defaults(tmp_path: Path) -> None:
    scenario = load_scenario(str(write_scenario(tmp_path, "seed = 9\n")))
    assert scenario.config == RunConfig.from_mapping({"seed": 9})
    assert scenario.description == ""


def test_missing_scenario_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    assert str(missing) in scenario_error(missing)
    with pytest.raises(ScenarioError):
        resolve_scenario_path(str(missing))


def test_unknown_key_names_the_file_and_key_and_lists_valid_ones(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, 'task = "heart"\nnum-rounds = 3\n')
    message = scenario_error(path)
    assert str(path) in message
    assert "'num-rounds'" in message
    for key in RunConfig.keys():
        assert key in message


def test_wrong_type_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, 'num-clients = "four"\n')
    message = scenario_error(path)
    assert str(path) in message
    assert "'num-clients'" in message
    assert "expected int" in message


def test_out_of_range_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "test-fraction = 1.5\n")
    message = scenario_error(path)
    assert str(path) in message
    assert "'test-fraction'" in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "task = heart\n")
    message = scenario_error(path)
    assert str(path) in message
    assert "not valid TOML" in message


def test_non_utf8_file_is_a_scenario_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "Zürich"\n'.encode("latin-1"))
    assert str(path) in scenario_error(path)


# ------------------------------------------------------------------------------- resources


def test_more_cpus_per_client_than_the_machine_has_names_the_key(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    path = write_scenario(tmp_path, f"[resources]\ncpus-per-client = {cores + 1}\n")
    message = scenario_error(path)
    assert "'cpus-per-client'" in message
    assert str(path) in message
    assert f"{cores} cores" in message


def test_all_the_machines_cpus_per_client_is_accepted(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    path = write_scenario(tmp_path, f"[resources]\ncpus-per-client = {cores}\n")
    assert load_scenario(str(path)).resources.cpus_per_client == float(cores)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_cpus_per_client_is_rejected(tmp_path: Path, value: str) -> None:
    path = write_scenario(tmp_path, f"[resources]\ncpus-per-client = {value}\n")
    assert "'cpus-per-client'" in scenario_error(path)


@pytest.mark.parametrize("value", ["1.5", "-0.5"])
def test_gpus_per_client_outside_zero_to_one_is_rejected(tmp_path: Path, value: str) -> None:
    path = write_scenario(tmp_path, f"[resources]\ngpus-per-client = {value}\n")
    assert "'gpus-per-client'" in scenario_error(path)


@pytest.mark.parametrize("value", ['"2"', "true"])
def test_non_numeric_resource_is_rejected_naming_it(tmp_path: Path, value: str) -> None:
    path = write_scenario(tmp_path, f"[resources]\ncpus-per-client = {value}\n")
    message = scenario_error(path)
    assert "resources.cpus-per-client" in message
    assert "must be a number" in message


def test_unknown_resource_key_lists_the_valid_ones(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "[resources]\nmemory-per-client = 4\n")
    message = scenario_error(path)
    assert "resources.memory-per-client" in message
    assert "cpus-per-client" in message
    assert "gpus-per-client" in message


def test_resources_that_are_not_a_table_are_rejected(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "resources = 2\n")
    assert "[resources] must be a table" in scenario_error(path)
