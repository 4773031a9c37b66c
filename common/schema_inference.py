"""Draft a schema from one site's file (`confide schema infer`), for a person to review.

Apart from common/schema.py because it reads a data file (common/site_data.py), which itself
needs the schema to check one: the schema stays free of file reading, and nothing imports back.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.schema import CategoricalFeature, NumericFeature, Schema, SchemaError, parse_number
from common.site_data import read_table_numbered

# Heuristics of infer_schema (see its docstring).
_TEXT_MEDIAN_CHARS = 40
_TEXT_MIN_DISTINCT = 20
_ID_MIN_ROWS = 50


def infer_schema(path: Path, label: str, *, ignore: Collection[str] = ()) -> Schema:
    """Draft a schema from one file, for a person to review before the federation uses it.

    - numeric: every value parses as a finite number; center = mean, scale = population
      std (1.0 if the column is constant), both rounded to 6 significant digits;
    - text: not numeric, and long free text (median length > 40 characters, or at least
      20 distinct values, at least half of the rows distinct and at least half containing
      a space); at most one such column, and then no other feature columns;
    - categorical: everything else, categories = sorted distinct values.

    Categories are copied into a file every site receives, so a column with a different
    value in almost every row (an identifier, a name) is refused rather than published;
    list such columns in ``ignore``. Raises SchemaError (bad label, ambiguous columns) or
    common.site_data.DataFileError (unreadable file).
    """
    path = Path(path)
    rows, row_numbers = read_table_numbered(path)
    try:
        return _infer(rows, row_numbers, label, ignore)
    except SchemaError as exc:
        raise SchemaError(f"{path.name}: {exc}") from None


def _infer(
    rows: Sequence[Mapping[str, str]],
    row_numbers: Sequence[int],
    label: str,
    ignore: Collection[str],
) -> Schema:
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

    numeric: list[NumericFeature] = []
    categorical: list[CategoricalFeature] = []
    text_columns: list[tuple[float, str]] = []
    for col in columns:
        if col == label or col in ignore:
            continue
        values = [row.get(col, "").strip() for row in rows]
        numbers = [parse_number(v) for v in values]
        if all(n is not None for n in numbers):
            numeric.append(_numeric_feature(col, np.array(numbers, dtype=np.float64)))
            continue
        distinct = set(values)
        median_chars = float(np.median([len(v) for v in values]))
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
                "(an identifier?) and they would be copied into the shared schema; "
                "drop the column or list it in ignore"
            )
        categorical.append(CategoricalFeature(col, tuple(sorted(distinct))))

    if len(text_columns) > 1:
        names = [c for _, c in text_columns]
        raise SchemaError(
            f"columns {names} all look like free text but a schema has one text field; "
            "list all but one in ignore"
        )
    classes = tuple(sorted(set(labels)))
    if not text_columns:
        return Schema(label, classes, tuple(numeric), tuple(categorical))
    text = text_columns[0][1]
    others = [f.name for f in (*numeric, *categorical)]
    if others:
        raise SchemaError(
            f"column {text!r} looks like free text, and a text schema has only the text and "
            f"the label; list the other columns {others} in ignore"
        )
    return Schema(label, classes, text=text)


def _numeric_feature(name: str, values: np.ndarray) -> NumericFeature:
    with np.errstate(over="ignore", invalid="ignore"):
        mean = float(values.mean())
        std = float(values.std())
    if not math.isfinite(mean):
        raise SchemaError(
            f"column {name!r} has values too large to average; rescale the column "
            "(e.g. change its unit) or write its center and scale by hand"
        )
    scale = _round(std) if math.isfinite(std) else 0.0
    return NumericFeature(name, _round(mean), scale if scale > 0 else 1.0)


def _round(value: float) -> float:
    """Six significant digits: plenty for scaling, and readable in the TOML file."""
    return float(f"{value:.6g}")
