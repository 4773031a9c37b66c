"""Reading and encoding one site's file: formats, every error case, and encoded values."""

from __future__ import annotations

import gzip
import json
import pickle
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.schema import CategoricalFeature, NumericFeature, Schema
from common.site_data import (
    MAX_SHOWN,
    DataFileError,
    EncodedDataset,
    encode_rows,
    load_site_data,
    read_table,
)
from common.text_tokenizer import encode_texts

SCHEMA = Schema(
    label="y",
    classes=("no", "yes"),
    numeric=(NumericFeature("age", 40.0, 10.0),),
    categorical=(CategoricalFeature("job", ("admin.", "blue-collar")),),
)
TEXT_SCHEMA = Schema(label="y", classes=("no", "yes"), text="note")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, schema: Schema = SCHEMA, **kwargs: object) -> list[str]:
    with pytest.raises(DataFileError) as info:
        load_site_data(path, schema, **kwargs)
    return info.value.problems


def only_problem(path: Path, schema: Schema = SCHEMA) -> str:
    problems = problems_of(path, schema)
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    assert problems[0].startswith(f"{path.name}: ")
    return problems[0]


# ------------------------------------------------------------------------------ read_table


@pytest.mark.parametrize("delimiter", [",", ";", "\t"], ids=["comma", "semicolon", "tab"])
def test_csv_delimiter_is_detected(tmp_path: Path, delimiter: str) -> None:
    lines = [delimiter.join(["age", "job", "y"]), delimiter.join(["41", "a b", "no"])]
    path = write(tmp_path / "s.csv", "\n".join(lines) + "\n")
    assert read_table(path) == [{"age": "41", "job": "a b", "y": "no"}]


def test_semicolon_file_with_quoted_header(tmp_path: Path) -> None:
    path = write(tmp_path / "bank.csv", '"age";"job";"y"\n58;"management";"no"\n')
    assert read_table(path) == [{"age": "58", "job": "management", "y": "no"}]


def test_quoted_fields_may_hold_delimiters_and_newlines(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", 'note,y\n"pain, then\nfever",yes\n')
    assert read_table(path) == [{"note": "pain, then\nfever", "y": "yes"}]


def test_bom_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfage,y\r\n1,no\r\n\r\n,\r\n2,yes\r\n")
    assert read_table(path) == [{"age": "1", "y": "no"}, {"age": "2", "y": "yes"}]


def test_gzipped_csv(tmp_path: Path) -> None:
    path = tmp_path / "s.csv.gz"
    path.write_bytes(gzip.compress(b"age,y\n1,no\n"))
    assert read_table(path) == [{"age": "1", "y": "no"}]


def test_jsonl_values_become_strings(tmp_path: Path) -> None:
    record = {"age": 41, "w": 1.5, "smoker": True, "job": None, "tags": ["a"], "y": "no"}
    path = write(tmp_path / "s.jsonl", json.dumps(record) + "\n\n")
    assert read_table(path) == [
        {"age": "41", "w": "1.5", "smoker": "true", "job": "", "tags": '["a"]', "y": "no"}
    ]


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"age": 1, "y": "no"}\n'))
    assert read_table(path) == [{"age": "1", "y": "no"}]


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in only_problem(tmp_path / "bank.csv")


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    assert "empty" in only_problem(write(tmp_path / name, "\n  \n"))


def test_header_only(tmp_path: Path) -> None:
    assert "no data rows" in only_problem(write(tmp_path / "h.csv", "age,job,y\n"))


def test_non_utf8_bytes_report_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("age,job,y\n41,employé,no\n".encode("latin-1"))
    message = only_problem(path)
    assert "not UTF-8" in message
    assert "byte 0xe9 at byte offset 19" in message
    assert "line 2" in message


def test_utf16_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("age,job,y\n1,a,no\n".encode("utf-16"))
    assert "UTF-16" in only_problem(path)


def test_duplicate_header_names(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "d.csv", "age,job,age,y\n1,a,2,no\n"))
    assert "'age' appears 2 times" in message


def test_ragged_row_names_the_row(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "r.csv", "age,job,y\n41,admin.,no\n42,admin.\n"))
    assert "row 3" in message
    assert "has 2 fields but the header has 3" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", '{"age": 1, "job": "a", "y": "no"}\n[1, 2]\n')
    message = only_problem(path)
    assert "row 2" in message
    assert "expected a JSON object" in message


def test_jsonl_line_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", '{"age": 1, "job": "a", "y": "no"}\n{"age": 2,\n')
    message = only_problem(path)
    assert "row 2" in message
    assert "not valid JSON" in message


def test_json_array_file_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", '[{"age": 1, "job": "a", "y": "no"}]\n')
    assert "JSON array" in only_problem(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    assert "CSV UTF-8" in only_problem(write(tmp_path / "s.xlsx", "x"))


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "s.csv.gz"
    path.write_bytes(b"not gzip at all")
    assert "gzip" in only_problem(path)


# ------------------------------------------------------------------------------ encode_rows


def test_missing_column(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "m.csv", "age,y\n41,no\n"))
    assert "column 'job' is missing" in message


def test_extra_column_is_an_error(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "e.csv", "age,job,y,ssn\n41,a,no,123\n"))
    assert "column 'ssn' is not in the schema" in message


def test_extra_column_can_be_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", "age,job,y,ssn\n41,a,no,123\n")
    assert len(load_site_data(path, SCHEMA, ignore={"ssn"})) == 1


def test_value_that_is_not_a_number(tmp_path: Path) -> None:
    path = write(tmp_path / "bank.csv", "age,job,y\n41,a,no\nabc,a,no\n")
    assert only_problem(path) == (
        "bank.csv: row 3, column 'age': 'abc' is not a number; "
        "fix the value or mark the column categorical in the schema"
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_non_finite_number(tmp_path: Path, value: str) -> None:
    message = only_problem(write(tmp_path / "n.csv", f"age,job,y\n{value},a,no\n"))
    assert f"row 2, column 'age': '{value}' is not a finite number" in message


def test_empty_number(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "n.csv", "age,job,y\n,a,no\n"))
    assert "row 2, column 'age': empty value" in message


def test_decimal_comma_gets_a_hint(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "n.csv", 'age;job;y\n"41,5";a;no\n'))
    assert "'41,5' is not a number (write decimals with '.'" in message


def test_unknown_label_lists_classes(tmp_path: Path) -> None:
    message = only_problem(write(tmp_path / "l.csv", "age,job,y\n41,a,maybe\n"))
    assert "row 2, column 'y': label 'maybe' is not a class" in message
    assert "'no', 'yes'" in message


def test_jsonl_rows_are_numbered_by_line(tmp_path: Path) -> None:
    lines = ['{"age": 1, "job": "a", "y": "no"}', "", '{"age": "x", "job": "a", "y": "no"}']
    message = only_problem(write(tmp_path / "s.jsonl", "\n".join(lines)))
    assert "row 3, column 'age'" in message


def test_jsonl_row_missing_a_key(tmp_path: Path) -> None:
    lines = ['{"age": 1, "job": "a", "y": "no"}', '{"age": 2, "y": "no"}']
    message = only_problem(write(tmp_path / "s.jsonl", "\n".join(lines)))
    assert "row 2: column 'job' is missing" in message


def test_three_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path / "bank.csv", "age,job,y,extra\nabc,a,no,1\n41,a,maybe,2\n")
    problems = problems_of(path)
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "'extra' is not in the schema" in text
    assert "row 2, column 'age': 'abc'" in text
    assert "row 3, column 'y': label 'maybe'" in text


def test_error_message_has_header_and_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "bank.csv", "age,job,y\nabc,a,maybe\n")
    with pytest.raises(DataFileError) as info:
        load_site_data(path, SCHEMA)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("bank.csv: 2 problems")
    assert len(lines) == 3


def test_many_bad_rows_in_one_column_do_not_hide_other_problems(tmp_path: Path) -> None:
    rows = "".join("abc,a,no\n" for _ in range(100))
    path = write(tmp_path / "bank.csv", f"age,job,y\n{rows}41,a,maybe\n")
    with pytest.raises(DataFileError) as info:
        load_site_data(path, SCHEMA)
    text = str(info.value)
    assert "95 more rows" in text
    assert "label 'maybe'" in text


def test_long_problem_lists_are_cut_in_the_message(tmp_path: Path) -> None:
    columns = [f"c{i}" for i in range(30)]
    path = write(
        tmp_path / "w.csv", ",".join(["age", "job", "y", *columns]) + "\n" + "1,a,no" + ",0" * 30
    )
    with pytest.raises(DataFileError) as info:
        load_site_data(path, SCHEMA)
    assert len(info.value.problems) == 30
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + MAX_SHOWN + 1
    assert lines[-1].strip() == f"... and {30 - MAX_SHOWN} more"


def test_error_survives_pickling(tmp_path: Path) -> None:
    error = DataFileError("x.csv", ["x.csv: a", "x.csv: b"])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert str(copy) == str(error)


def test_numbers_are_scaled_with_the_schema(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "age,job,y\n41,admin.,no\n20,admin.,yes\n")
    numeric, _ = load_site_data(path, SCHEMA).inputs
    assert numeric.dtype == np.float32
    np.testing.assert_allclose(numeric[:, 0], [0.1, -2.0], rtol=1e-6)


def test_categories_encode_as_one_plus_index(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "age,job,y\n1,admin.,no\n1,blue-collar,no\n")
    _, categorical = load_site_data(path, SCHEMA).inputs
    assert categorical.dtype == np.int64
    assert categorical[:, 0].tolist() == [1, 2]


def test_unseen_category_encodes_as_zero(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "age,job,y\n1,astronaut,no\n1,,no\n")
    _, categorical = load_site_data(path, SCHEMA).inputs
    assert categorical[:, 0].tolist() == [0, 0]


def test_labels_are_class_positions(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "age,job,y\n1,a,yes\n1,a,no\n1,a, yes \n")
    labels = load_site_data(path, SCHEMA).labels
    assert labels.dtype == np.int64
    assert labels.tolist() == [1, 0, 1]


def test_text_schema_encodes_token_ids_and_mask(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "note,y\nChest pain today,yes\n,no\n")
    dataset = load_site_data(path, TEXT_SCHEMA, vocab_size=100, max_length=5)
    ids, mask = dataset.inputs
    expected_ids, expected_mask = encode_texts(["Chest pain today", ""], 100, 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    assert dataset.labels.tolist() == [1, 0]


def test_subset_selects_the_same_rows_everywhere() -> None:
    dataset = EncodedDataset(
        (np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5)), np.arange(5) * 10
    )
    part = dataset.subset(np.array([4, 1]))
    assert len(part) == 2
    assert part.inputs[1].tolist() == [4, 1]
    assert part.labels.tolist() == [40, 10]
    assert len(dataset.subset(np.array([], dtype=np.int64))) == 0


def test_encode_rows_without_rows_is_an_error() -> None:
    with pytest.raises(DataFileError, match="no data rows"):
        encode_rows([], SCHEMA, "x.csv")


# ------------------------------------------------------------------------------ properties

SUFFIXES = [".csv", ".jsonl", ".csv.gz", ".jsonl.gz", ".tsv"]
CSV_CHARS = string.ascii_letters[:6] + "0123456789.,;\t\"'\n\r -+eEnoyesinf\x00\u00e9\u2028"
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped: hypothesis runs one test body many times within one fixture call."""
    return tmp_path_factory.mktemp("scratch")


def check_never_crashes(directory: Path, suffix: str, data: bytes, text_schema: bool) -> None:
    path = directory / f"site{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    try:
        rows = read_table(path)
        schema = TEXT_SCHEMA if text_schema else SCHEMA
        dataset = encode_rows(rows, schema, path.name, vocab_size=50, max_length=8)
    except DataFileError as error:
        assert error.problems
        assert all("\n" not in p for p in error.problems)
    else:
        assert len(dataset) == len(rows) > 0


@PROPERTY
@given(st.sampled_from(SUFFIXES), st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_read_or_raise_data_file_error(
    scratch: Path, suffix: str, data: bytes, text_schema: bool
) -> None:
    check_never_crashes(scratch, suffix, data, text_schema)


CELLS = st.one_of(
    st.sampled_from(["yes", "no", "admin.", "", " 1e308", "-1e308", "nan", "1,5", '"', "é"]),
    st.floats().map(repr),
    st.text(alphabet=CSV_CHARS, max_size=8),
)


@st.composite
def csv_files(draw: st.DrawFn) -> str:
    """Either free-form text or rows of plausible cells under a header."""
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    header = draw(st.sampled_from([["age", "job", "y"], ["note", "y"], []]))
    if draw(st.booleans()):
        body = draw(st.text(alphabet=CSV_CHARS, max_size=200))
    else:
        width = st.integers(len(header) - 1, len(header)) if header else st.integers(1, 3)
        rows = draw(st.lists(width.flatmap(lambda n: st.lists(CELLS, min_size=n, max_size=n))))
        body = "".join(delimiter.join(row) + "\n" for row in rows[:5])
    return (delimiter.join(header) + "\n" if header else "") + body


@PROPERTY
@given(csv_files(), st.booleans())
def test_arbitrary_csv_text_reads_or_raises_data_file_error(
    scratch: Path, content: str, text_schema: bool
) -> None:
    check_never_crashes(scratch, ".csv", content.encode(), text_schema)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)
JSON_LINES = st.one_of(
    st.dictionaries(st.sampled_from(["age", "job", "y", "note", "z"]), JSON_VALUES).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=20),
)


@PROPERTY
@given(st.lists(JSON_LINES, max_size=6), st.booleans())
def test_arbitrary_jsonl_reads_or_raises_data_file_error(
    scratch: Path, lines: list[str], text_schema: bool
) -> None:
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    check_never_crashes(scratch, ".jsonl", data, text_schema)
