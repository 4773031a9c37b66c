"""Schema TOML files: round trip, precise one-line errors, and inference from a file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.schema import (
    CategoricalFeature,
    NumericFeature,
    Schema,
    SchemaError,
    load_schema,
    save_schema,
)
from common.schema_inference import SchemaDraft, infer_schema
from confide.cli import app

TABULAR = Schema(
    label="y",
    classes=("no", "yes"),
    numeric=(NumericFeature("age", 41.0, 10.6), NumericFeature("blood pressure", -0.5, 2e-7)),
    categorical=(CategoricalFeature("job", ("admin.", "blue-collar", 'say "hi"')),),
)
TEXT = Schema(label="intent", classes=("a", "b", "c"), text="message")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, toml: str) -> str:
    path = write(tmp_path / "federation.toml", toml)
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("federation.toml: ")
    return message


VALID = 'label = "y"\nclasses = ["no", "yes"]\n[numeric.age]\ncenter = 41.0\nscale = 10.6\n'


# ------------------------------------------------------------------------------ data classes


def test_columns_lists_features_then_label() -> None:
    assert TABULAR.columns() == ("age", "blood pressure", "job", "y")
    assert TEXT.columns() == ("message", "intent")


def test_category_sizes_include_the_unknown_slot() -> None:
    assert TABULAR.category_sizes() == (4,)


def test_a_column_cannot_have_two_roles() -> None:
    with pytest.raises(SchemaError, match="only one role"):
        Schema("age", ("0", "1"), numeric=(NumericFeature("age", 0.0, 1.0),))


def test_text_schema_cannot_also_have_tabular_features() -> None:
    with pytest.raises(SchemaError, match="text schema"):
        Schema("y", ("0", "1"), numeric=(NumericFeature("age", 0.0, 1.0),), text="note")


# ------------------------------------------------------------------------------ load and save


@pytest.mark.parametrize("schema", [TABULAR, TEXT], ids=["tabular", "text"])
def test_save_then_load_round_trips(tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "schema.toml"
    save_schema(schema, path)
    assert load_schema(path) == schema


def test_save_replaces_existing_file_without_leaving_temp_files(tmp_path: Path) -> None:
    path = write(tmp_path / "schema.toml", "old")
    save_schema(TEXT, path)
    assert load_schema(path) == TEXT
    assert [p.name for p in tmp_path.iterdir()] == ["schema.toml"]


def test_load_reads_documented_layout_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "schema.toml",
        'label = "y"\nclasses = ["no", "yes"]\n'
        "[numeric.zeta]\ncenter = 1\nscale = 2\n"
        "[numeric.alpha]\ncenter = 0.5\nscale = 1.5\n"
        '[categorical.job]\ncategories = ["admin.", "blue-collar"]\n',
    )
    schema = load_schema(path)
    assert [f.name for f in schema.numeric] == ["zeta", "alpha"]
    assert schema.numeric[0] == NumericFeature("zeta", 1.0, 2.0)
    assert schema.categorical == (CategoricalFeature("job", ("admin.", "blue-collar")),)


def test_integer_classes_are_read_as_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", 'label = "y"\nclasses = [0, 1]\ntext = "t"\n')
    assert load_schema(path).classes == ("0", "1")


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'labels = "x"\n' + VALID)
    assert "'labels'" in message
    assert "not a schema key" in message


def test_unknown_key_inside_feature_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID + "scales = 3\n")
    assert "numeric.age.scales" in message


@pytest.mark.parametrize("scale", ["0", "-1.5", "nan", "inf"])
def test_scale_must_be_positive_and_finite(tmp_path: Path, scale: str) -> None:
    message = load_error(tmp_path, VALID.replace("10.6", scale))
    assert "numeric.age.scale" in message
    assert "> 0" in message


def test_missing_scale_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID.replace("scale = 10.6\n", ""))
    assert "numeric.age.scale" in message
    assert "missing" in message


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (VALID.replace('classes = ["no", "yes"]', 'classes = "yes"'), "'classes'"),
        (VALID.replace('classes = ["no", "yes"]', "classes = [1.5]"), "'classes'"),
        (VALID.replace("center = 41.0", 'center = "41"'), "numeric.age.center"),
        (VALID.replace("center = 41.0", "center = true"), "numeric.age.center"),
        (VALID.replace('label = "y"', "label = 3"), "'label'"),
        (VALID + "[categorical.job]\ncategories = 3\n", "categorical.job.categories"),
    ],
    ids=["classes-string", "classes-float", "center-string", "center-bool", "label", "cats"],
)
def test_wrong_type_is_named(tmp_path: Path, toml: str, key: str) -> None:
    assert key in load_error(tmp_path, toml)


def test_empty_classes_rejected(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID.replace('["no", "yes"]', "[]"))
    assert "'classes'" in message
    assert "empty" in message


def test_duplicate_class_rejected(tmp_path: Path) -> None:
    assert "listed twice" in load_error(tmp_path, VALID.replace('"yes"', '"no"'))


def test_schema_without_features_rejected(tmp_path: Path) -> None:
    assert "no features" in load_error(tmp_path, 'label = "y"\nclasses = ["a"]\n')


def test_invalid_toml_reports_position(tmp_path: Path) -> None:
    assert "line 2" in load_error(tmp_path, 'label = "y"\nclasses = ["a",,]\n')


def test_missing_schema_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not found"):
        load_schema(tmp_path / "nope.toml")


def test_feature_name_with_spaces_is_quoted_in_messages(tmp_path: Path) -> None:
    toml = VALID.replace("[numeric.age]", '[numeric."blood pressure"]').replace("10.6", "0")
    assert 'numeric."blood pressure".scale' in load_error(tmp_path, toml)


# ------------------------------------------------------------------------------------ infer


def small_csv(tmp_path: Path) -> Path:
    lines = ["age,job,note,y"]
    jobs = ["admin.", "blue-collar", "admin."]
    for i in range(6):
        note = f"Patient {i} was seen in clinic and reported mild symptoms after treatment."
        lines.append(f"{30 + 2 * i},{jobs[i % 3]},{note},{'yes' if i % 2 else 'no'}")
    return write(tmp_path / "site.csv", "\n".join(lines) + "\n")


def test_infer_detects_numeric_categorical_and_text_columns(tmp_path: Path) -> None:
    draft = infer_schema(small_csv(tmp_path), "y", ignore=["note"])
    assert draft == SchemaDraft("y", numeric=("age",), categorical=(("job", ()),))


def test_infer_lists_classes_and_categories_only_when_asked(tmp_path: Path) -> None:
    draft = infer_schema(small_csv(tmp_path), "y", ignore=["note"], list_values=True)
    assert draft.classes == ("no", "yes")
    assert draft.categorical == (("job", ("admin.", "blue-collar")),)


def test_infer_detects_long_free_text(tmp_path: Path) -> None:
    path = small_csv(tmp_path)
    assert infer_schema(path, "y", ignore=["age", "job"]) == SchemaDraft("y", text="note")


def test_infer_refuses_text_next_to_other_features(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="ignore"):
        infer_schema(small_csv(tmp_path), "y")


def test_infer_refuses_identifier_columns(tmp_path: Path) -> None:
    lines = ["patient,y"] + [f"P-{i:04d},{i % 2}" for i in range(60)]
    path = write(tmp_path / "ids.csv", "\n".join(lines) + "\n")
    with pytest.raises(SchemaError, match=r"'patient'.*identifier"):
        infer_schema(path, "y")


def test_infer_unknown_label_column(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="label column 'target' not found"):
        infer_schema(small_csv(tmp_path), "target")


def test_infer_reads_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl.gz"
    records = [{"age": 20, "smoker": True, "y": 1}, {"age": 40, "smoker": False, "y": 0}]
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))
    draft = infer_schema(path, "y", list_values=True)
    assert draft == SchemaDraft(
        "y", ("0", "1"), numeric=("age",), categorical=(("smoker", ("false", "true")),)
    )


def test_a_drafted_schema_holds_nothing_of_the_records(tmp_path: Path) -> None:
    """Neighbouring files (one record changed, one added) give the same bytes: no mean, spread,
    extreme, category or class of the records reaches the file every party receives."""
    first = small_csv(tmp_path)
    lines = first.read_text().splitlines()
    lines[1] = lines[1].replace("30,admin.", "97,technician").replace(",no", ",maybe")
    lines.append("-5,retired,A short note,yes")
    second = write(tmp_path / "neighbour.csv", "\n".join(lines) + "\n")
    infer_schema(first, "y", ignore=["note"]).save(tmp_path / "first.toml")
    infer_schema(second, "y", ignore=["note"]).save(tmp_path / "second.toml")
    written = (tmp_path / "first.toml").read_bytes()
    assert written == (tmp_path / "second.toml").read_bytes()
    assert b"admin." not in written and b"35" not in written  # a category, the mean age


def test_a_draft_is_refused_until_its_classes_are_typed(tmp_path: Path) -> None:
    infer_schema(small_csv(tmp_path), "y", ignore=["note"]).save(tmp_path / "schema.toml")
    with pytest.raises(SchemaError, match="'classes': is empty"):
        load_schema(tmp_path / "schema.toml")


def test_a_draft_loads_once_its_todos_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    infer_schema(small_csv(tmp_path), "y", ignore=["note"]).save(path)
    typed = (
        path.read_text()
        .replace("classes = []", 'classes = ["no", "yes"]')
        .replace("center = 0.0\nscale = 1.0", "center = 40.0\nscale = 12.5")
        .replace("categories = []", 'categories = ["admin.", "retired"]')
    )
    path.write_text(typed)
    assert load_schema(path) == Schema(
        "y",
        ("no", "yes"),
        (NumericFeature("age", 40.0, 12.5),),
        (CategoricalFeature("job", ("admin.", "retired")),),
    )


def test_a_draft_with_listed_values_loads_with_numbers_unscaled(tmp_path: Path) -> None:
    draft = infer_schema(small_csv(tmp_path), "y", ignore=["note"], list_values=True)
    draft.save(tmp_path / "schema.toml")
    assert load_schema(tmp_path / "schema.toml") == Schema(
        "y",
        ("no", "yes"),
        (NumericFeature("age", 0.0, 1.0),),
        (CategoricalFeature("job", ("admin.", "blue-collar")),),
    )


def test_a_text_draft_loads_once_its_classes_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    infer_schema(small_csv(tmp_path), "y", ignore=["age", "job"]).save(path)
    path.write_text(path.read_text().replace("classes = []", 'classes = ["no", "yes"]'))
    assert load_schema(path) == Schema("y", ("no", "yes"), text="note")


def test_schema_infer_prints_what_to_type(tmp_path: Path) -> None:
    data = small_csv(tmp_path)
    args = ["schema", "infer", str(data), "--label", "y", "--ignore", "note"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "classes\n  numeric.age: center, scale\n  categorical.job: categories" in result.stdout
    assert "warning" not in result.stderr
    assert (tmp_path / "site.schema.toml").exists()


def test_schema_infer_warns_when_it_lists_record_values(tmp_path: Path) -> None:
    data = small_csv(tmp_path)
    args = ["schema", "infer", str(data), "--label", "y", "--ignore", "note", "--list-categories"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "numeric.age: center, scale" in result.stdout
    assert "categorical.job" not in result.stdout
    assert "warning:" in result.stderr and "record content" in result.stderr
