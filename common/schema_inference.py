"""Draft a schema from one site's file (`confide schema infer`), for its operator to complete.

A schema goes to every party, outside any privacy ledger, so the draft holds what the file's
columns are and nothing its records hold: a mean, a standard deviation or a minimum is a
statistic of them (a 0/1 column's mean and the row count give the count of ones), and a
category seen once tells every party that such a record exists. The operator types the
normalisation constants and the lists of values from references the federation agrees on; on
request the lists are copied from the file instead, for the operator to review.

Apart from common/schema.py because it reads a data file (common/site_data.py), which itself
needs the schema to check one: the schema stays free of file reading, and nothing imports back.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common.atomic_file import write_atomically
from common.schema import SchemaError, parse_number, toml_key
from common.site_data import read_table_numbered

# Heuristics of infer_schema (see its docstring).
_TEXT_MEDIAN_CHARS = 40
_TEXT_MIN_DISTINCT = 20
_ID_MIN_ROWS = 50

_HEADER = """\
# Confide data schema, drafted by `confide schema infer` from a file's columns alone.
# Every party receives it, so it holds no statistic of a site's records: type each TODO from
# reference values the federation agrees on (published norms, code lists).
# numeric.<column>: encoded as (value - center) / scale; center 0 and scale 1 leave it unscaled.
# categorical.<column>: encoded as 1 + position in categories; 0 = a value not listed.
# The order of the tables is the order of the model's inputs.
"""
_LISTED = """\
# classes and categories were copied from the file's records (--list-categories): they are
# record content, and a value seen in one record tells every party that record exists. Review
# each, and remove what the federation has not agreed on, before sharing this file.
"""


@dataclass(frozen=True)
class SchemaDraft:
    """A file's columns by kind; an empty ``classes`` or category list is the operator's to type."""

    label: str
    classes: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, categories)
    text: str | None = None

    def todo(self) -> list[str]:
        """What the operator types before the federation uses the schema, one entry a table."""
        entries = [] if self.classes else ["classes"]
        entries += [f"{toml_key('numeric', name)}: center, scale" for name in self.numeric]
        return entries + [
            f"{toml_key('categorical', name)}: categories"
            for name, categories in self.categorical
            if not categories
        ]

    def toml(self) -> str:
        """The schema file: loadable once every TODO is typed (an empty ``classes`` is refused)."""
        listed = self.classes or any(categories for _, categories in self.categorical)
        parts = [_HEADER + (_LISTED if listed else "") + "\n", tomli_w.dumps({"label": self.label})]
        if not self.classes:
            parts.append('# TODO: the label\'s values, e.g. classes = ["no", "yes"]\n')
        parts.append(tomli_w.dumps({"classes": list(self.classes)}))
        if self.text is not None:
            parts.append(tomli_w.dumps({"text": self.text}))
        for name in self.numeric:
            key = toml_key("numeric", name)
            parts.append(
                f"\n# TODO: {key}: center and scale, a reference mean and standard deviation\n"
                + tomli_w.dumps({"numeric": {name: {"center": 0.0, "scale": 1.0}}})
            )
        for name, categories in self.categorical:
            key = toml_key("categorical", name)
            hint = "" if categories else f'# TODO: {key}: its values, e.g. ["a", "b"]\n'
            table = {"categorical": {name: {"categories": list(categories)}}}
            parts.append("\n" + hint + tomli_w.dumps(table))
        return "".join(parts)

    def save(self, path: Path) -> None:
        """Written atomically, so a crash never leaves half a schema where a site may read it."""
        write_atomically(Path(path), self.toml().encode("utf-8"))


def infer_schema(
    path: Path, label: str, *, ignore: Collection[str] = (), list_values: bool = False
) -> SchemaDraft:
    """Draft a schema from one file's columns, for its operator to complete and review.

    - numeric: every value parses as a finite number;
    - text: not numeric, and long free text (median length > 40 characters, or at least
      20 distinct values, at least half of the rows distinct and at least half containing
      a space); at most one such column, and then no other feature columns;
    - categorical: everything else.

    With ``list_values`` the label's classes and each categorical column's categories are its
    sorted distinct values (record content); without, they are left empty to be typed. A column
    with a different value in almost every row (an identifier, a name) is refused: as a feature
    it only tells records apart; list such columns in ``ignore``. Raises SchemaError (bad label,
    ambiguous columns) or common.site_data.DataFileError (unreadable file).
    """
    path = Path(path)
    rows, row_numbers = read_table_numbered(path)
    try:
        return _infer(rows, row_numbers, label, ignore, list_values)
    except SchemaError as exc:
        raise SchemaError(f"{path.name}: {exc}") from None


def _infer(
    rows: Sequence[Mapping[str, str]],
    row_numbers: Sequence[int],
    label: str,
    ignore: Collection[str],
    list_values: bool,
) -> SchemaDraft:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    if label not in columns:
        raise SchemaError(
            f"label column {label!r} not found; columns are {list(columns)}; "
            "pass the name of the column to predict"
        )
    unknown_ignored = sorted(c for c in ignore if c not in columns)
    if unknown_ignored:
        raise SchemaError(f"ignored columns {unknown_ignored} are not in the file; check them")

    labels = [row.get(label, "").strip() for row in rows]
    empty = [row_numbers[i] for i, v in enumerate(labels) if not v]
    if empty:
        raise SchemaError(
            f"label column {label!r} is empty in {len(empty)} rows (first at row {empty[0]}); "
            "fill them in or drop those rows"
        )

    numeric: list[str] = []
    categorical: list[tuple[str, tuple[str, ...]]] = []
    text_columns: list[tuple[float, str]] = []
    for col in columns:
        if col == label or col in ignore:
            continue
        values = [row.get(col, "").strip() for row in rows]
        if all(parse_number(v) is not None for v in values):
            numeric.append(col)
            continue
        distinct = set(values)
        median_chars = statistics.median(len(v) for v in values)
        spaced = sum(" " in v for v in values)
        if median_chars > _TEXT_MEDIAN_CHARS or (
            len(distinct) >= _TEXT_MIN_DISTINCT
            and 2 * len(distinct) >= len(values)
            and 2 * spaced >= len(values)
        ):
            text_columns.append((median_chars, col))
            continue
        if len(values) >= _ID_MIN_ROWS and 2 * len(distinct) > len(values):
            raise SchemaError(
                f"column {col!r} has {len(distinct)} different values in {len(values)} rows "
                "(an identifier?), which tell records apart rather than predict; "
                "drop the column or list it in ignore"
            )
        categorical.append((col, tuple(sorted(distinct)) if list_values else ()))

    if len(text_columns) > 1:
        names = [c for _, c in text_columns]
        raise SchemaError(
            f"columns {names} all look like free text but a schema has one text field; "
            "list all but one in ignore"
        )
    classes = tuple(sorted(set(labels))) if list_values else ()
    if not text_columns:
        return SchemaDraft(label, classes, tuple(numeric), tuple(categorical))
    text = text_columns[0][1]
    others = [*numeric, *(name for name, _ in categorical)]
    if others:
        raise SchemaError(
            f"column {text!r} looks like free text, and a text schema has only the text and "
            f"the label; list the other columns {others} in ignore"
        )
    return SchemaDraft(label, classes, text=text)
