"""Specifications for common.run_config: defaults, names, types and ranges of every run setting."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from common.run_config import (
    PROJECT_ROOT,
    RunConfig,
    RunConfigError,
    default_run_config,
    parse_override,
)


def manifest_defaults() -> dict[str, object]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as manifest:
        return tomllib.load(manifest)["tool"]["flwr"]["app"]["config"]


def config_error(values: dict[str, object]) -> str:
    with pytest.raises(RunConfigError) as info:
        RunConfig.from_mapping(values)
    return str(info.value)


# ------------------------------------------------------------------------------- defaults


def test_empty_mapping_takes_every_default_from_pyproject() -> None:
    assert RunConfig.from_mapping({}).to_mapping() == manifest_defaults()


def test_pyproject_defines_exactly_the_run_config_keys() -> None:
    assert set(default_run_config()) == set(RunConfig.keys())


def test_pyproject_defaults_pass_validation() -> None:
    config = RunConfig.from_mapping({})
    config.validate()  # does not raise


def test_given_values_override_defaults_and_others_keep_theirs() -> None:
    config = RunConfig.from_mapping({"num-clients": 7, "learning-rate": 0.1})
    defaults = manifest_defaults()
    assert config.num_clients == 7
    assert config.learning_rate == 0.1
    assert config.batch_size == defaults["batch-size"]
    assert config.task == defaults["task"]


def test_to_mapping_round_trips_through_from_mapping() -> None:
    config = RunConfig.from_mapping({"task": "bank", "partitioner": "iid", "seed": 3})
    assert RunConfig.from_mapping(config.to_mapping()) == config


# ---------------------------------------------------------------------------- unknown keys


def test_unknown_key_error_names_it_and_lists_every_valid_setting() -> None:
    message = config_error({"num-client": 3})
    assert "'num-client'" in message
    for key in RunConfig.keys():
        assert key in message


def test_unknown_key_error_names_the_source() -> None:
    with pytest.raises(RunConfigError, match=r"^my-scenario\.toml: unknown setting"):
        RunConfig.from_mapping({"bogus": 1}, source="my-scenario.toml")


def test_snake_case_key_is_unknown() -> None:
    assert "'num_clients'" in config_error({"num_clients": 3})


# ----------------------------------------------------------------------------------- types


def test_string_for_int_setting_names_the_key_and_expected_type() -> None:
    message = config_error({"num-clients": "4"})
    assert "'num-clients'" in message
    assert "expected int" in message


def test_bool_for_int_setting_is_rejected() -> None:
    message = config_error({"num-server-rounds": True})
    assert "'num-server-rounds'" in message
    assert "bool" in message


def test_bool_for_float_setting_is_rejected() -> None:
    message = config_error({"learning-rate": True})
    assert "'learning-rate'" in message
    assert "expected float" in message


def test_float_for_int_setting_is_rejected() -> None:
    assert "'batch-size'" in config_error({"batch-size": 16.0})


def test_int_for_str_setting_is_rejected() -> None:
    message = config_error({"task": 1})
    assert "'task'" in message
    assert "expected str" in message


def test_int_is_accepted_for_float_setting_and_becomes_a_float() -> None:
    config = RunConfig.from_mapping({"learning-rate": 1, "round-timeout": 30})
    assert config.learning_rate == 1.0
    assert type(config.learning_rate) is float
    assert type(config.round_timeout) is float


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_is_rejected_naming_the_key(value: float) -> None:
    message = config_error({"learning-rate": value})
    assert "'learning-rate'" in message
    assert "finite" in message


def test_nan_is_rejected_even_where_any_finite_value_is_in_range() -> None:
    # weight-decay accepts every number >= 0; nan would slip through a range check alone.
    assert "'weight-decay'" in config_error({"weight-decay": float("nan")})


# ---------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("num-server-rounds", -1),
        ("num-clients", 0),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("fraction-evaluate", 1.01),
        ("test-fraction", 0.0),
        ("test-fraction", 1.0),
        ("dirichlet-alpha", 0.0),
        ("dirichlet-alpha", -0.5),
        ("local-epochs", 0),
        ("batch-size", 0),
        ("learning-rate", 0.0),
        ("weight-decay", -0.1),
        ("proximal-mu", -1.0),
        ("server-learning-rate", 0.0),
        ("round-timeout", 0.0),
        ("model-depth", 0),
        ("max-length", 0),
        ("vocab-size", 2),
        ("task", "heart-disease"),
        ("partitioner", "random"),
        ("strategy", "fedsgd"),
    ],
)
def test_out_of_range_value_names_the_key_and_the_value(key: str, value: object) -> None:
    message = config_error({key: value})
    assert f"'{key}' = {value!r} is invalid" in message


@pytest.mark.parametrize(
    ("key", "value"), [("fraction-train", 1.0), ("fraction-evaluate", 1), ("test-fraction", 0.5)]
)
def test_fraction_upper_bounds_are_as_documented(key: str, value: float) -> None:
    assert getattr(RunConfig.from_mapping({key: value}), key.replace("-", "_")) == value


def test_unknown_task_error_lists_the_tasks() -> None:
    message = config_error({"task": "mnist"})
    for task in ("heart", "bank", "banking77", "medical-text", "custom"):
        assert task in message


def test_model_width_not_a_multiple_of_heads_names_model_width_and_heads() -> None:
    message = config_error({"model-width": 30, "model-heads": 4})
    assert "'model-width' = 30" in message
    assert "model-heads (4)" in message


def test_model_width_multiple_of_heads_is_accepted() -> None:
    config = RunConfig.from_mapping({"model-width": 48, "model-heads": 6})
    assert (config.model_width, config.model_heads) == (48, 6)


@pytest.mark.parametrize(
    "files", [{}, {"data-file": "d.csv"}, {"schema-file": "s.toml"}], ids=["none", "data", "schema"]
)
def test_custom_task_needs_both_data_and_schema_files(files: dict[str, str]) -> None:
    message = config_error({"task": "custom", **files})
    assert "'data-file'" in message
    assert "'schema-file'" in message


def test_custom_task_with_both_files_is_accepted() -> None:
    config = RunConfig.from_mapping(
        {"task": "custom", "data-file": "d.csv", "schema-file": "s.toml"}
    )
    assert config.task == "custom"


def test_validate_rechecks_a_config_built_directly() -> None:
    good = RunConfig.from_mapping({})
    bad = dataclasses.replace(good, num_clients=0)
    with pytest.raises(RunConfigError, match="'num-clients'"):
        bad.validate("cli")


# ------------------------------------------------------------------------ every problem at once


def test_two_out_of_range_settings_are_both_named_in_one_line() -> None:
    message = config_error({"num-clients": 0, "learning-rate": -1.0})
    assert "'num-clients' = 0 is invalid; use an integer >= 1" in message
    assert "'learning-rate' = -1.0 is invalid; use a number > 0" in message
    assert "\n" not in message


def test_an_unknown_setting_and_a_mistyped_one_are_both_named() -> None:
    message = config_error({"colour": "blue", "batch-size": "16"})
    assert "unknown setting 'colour'" in message
    assert "'batch-size' = '16' is a str; expected int" in message


def test_a_range_problem_and_a_combination_problem_are_both_named() -> None:
    message = config_error({"seed": -1, "dp": True, "strategy": "fedprox"})
    assert "'seed' = -1 is invalid" in message
    assert "strategy 'fedprox' with dp = true" in message


def test_each_problem_names_the_source() -> None:
    with pytest.raises(RunConfigError) as info:
        RunConfig.from_mapping({"local-epochs": 0, "batch-size": 0}, source="my.toml")
    assert str(info.value).count("my.toml: ") == 2


# ---------------------------------------------------------------------------- parse_override


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("num-clients=3", ("num-clients", 3)),
        ("learning-rate=0.5", ("learning-rate", 0.5)),
        ("learning-rate=1e-3", ("learning-rate", 0.001)),
        ("flag=true", ("flag", True)),
        ("flag=false", ("flag", False)),
        ("task=bank", ("task", "bank")),
        ('task="3"', ("task", "3")),
        ("data-file=/data/site a.csv", ("data-file", "/data/site a.csv")),
        (" seed = 7 ", ("seed", 7)),
        ('run-dir="a=b"', ("run-dir", "a=b")),
    ],
)
def test_override_value_is_typed_as_toml_would_type_it(
    assignment: str, expected: tuple[str, object]
) -> None:
    key, value = parse_override(assignment)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("assignment", ["num-clients", "=3", " =3", ""])
def test_override_without_key_and_equals_sign_is_an_error(assignment: str) -> None:
    with pytest.raises(RunConfigError, match="expected KEY=VALUE"):
        parse_override(assignment)


def test_parsed_overrides_build_a_valid_config() -> None:
    overrides = dict(
        parse_override(a) for a in ["num-clients=6", "learning-rate=1", "partitioner=iid"]
    )
    config = RunConfig.from_mapping(overrides)
    assert (config.num_clients, config.learning_rate, config.partitioner) == (6, 1.0, "iid")


def test_nan_override_is_rejected_by_the_config() -> None:
    key, value = parse_override("learning-rate=nan")
    assert "'learning-rate'" in config_error({key: value})
