"""The data schema a federation agrees on.

Every site encodes its file with the same schema, so scaling constants and category codes
mean the same thing everywhere and nothing is computed from pooled data. The schema lives
in a small TOML file that people can read, review and edit before a federation starts.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.atomic_file import write_atomically

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOP_LEVEL_KEYS = ("label", "classes", "text", "numeric", "categorical")


class SchemaError(ValueError):
    """A schema that cannot be used; the message names the file, the key and the fix."""


def toml_key(*parts: str) -> str:
    """Dotted TOML key as a person would type it, e.g. ``numeric."blood pressure".scale``."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else _toml_value(p) for p in parts)


def parse_number(value: str) -> float | None:
    """The finite float in ``value``, else None.

    The same rule encode_rows applies, so a column inferred numeric always encodes.
    """
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class NumericFeature:
    """A number column, encoded as ``(x - center) / scale``."""

    name: str
    center: float
    scale: float

    def __post_init__(self) -> None:
        _check_name(self.name, "numeric")
        for attr in ("center", "scale"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SchemaError(
                    f"key '{toml_key('numeric', self.name, attr)}': must be a number, got {value!r}"
                )
            object.__setattr__(self, attr, float(value))
        if not math.isfinite(self.center):
            raise SchemaError(
                f"key '{toml_key('numeric', self.name, 'center')}': must be a finite number, "
                f"got {self.center}; set it to a reference value for the column (a published norm)"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SchemaError(
                f"key '{toml_key('numeric', self.name, 'scale')}': must be a finite number > 0, "
                f"got {self.scale}; set it to the column's standard deviation (or 1.0)"
            )


@dataclass(frozen=True)
class CategoricalFeature:
    """A column of labels, encoded as ``1 + index`` in ``categories``; 0 = a value not listed.

    Values a site has that the schema does not list are not errors: the federation cannot
    know every site's values in advance, and rejecting them would leak that they exist.
    """

    name: str
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_name(self.name, "categorical")
        categories = tuple(self.categories)
        key = toml_key("categorical", self.name, "categories")
        for value in categories:
            if not isinstance(value, str):
                raise SchemaError(f"key '{key}': every category must be a string, got {value!r}")
        _check_unique(categories, key)
        object.__setattr__(self, "categories", categories)


@dataclass(frozen=True)
class Schema:
    """Columns, their encodings and the label classes a federation trains on.

    Feature order is the order of the arrays handed to the model, so it is part of the
    agreement; ``load_schema`` keeps the order of the TOML file.
    """

    label: str
    classes: tuple[str, ...]
    numeric: tuple[NumericFeature, ...] = ()
    categorical: tuple[CategoricalFeature, ...] = ()
    text: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise SchemaError(f"key 'label': must be a non-empty string, got {self.label!r}")
        if self.text is not None and (not isinstance(self.text, str) or not self.text):
            raise SchemaError(f"key 'text': must be a non-empty string, got {self.text!r}")
        classes = tuple(self.classes)
        if not classes:
            raise SchemaError(
                'key \'classes\': is empty; list the label values, e.g. classes = ["no", "yes"]'
            )
        for value in classes:
            if not isinstance(value, str):
                raise SchemaError(f"key 'classes': every class must be a string, got {value!r}")
        _check_unique(classes, "classes")
        numeric = tuple(self.numeric)
        categorical = tuple(self.categorical)
        for item in numeric:
            if not isinstance(item, NumericFeature):
                raise SchemaError(f"key 'numeric': expected NumericFeature, got {item!r}")
        for item in categorical:
            if not isinstance(item, CategoricalFeature):
                raise SchemaError(f"key 'categorical': expected CategoricalFeature, got {item!r}")
        if self.text is not None and (numeric or categorical):
            raise SchemaError(
                "key 'text': a text schema cannot also have numeric or categorical features "
                "(the text model reads only the text); remove those tables or the text key"
            )
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "numeric", numeric)
        object.__setattr__(self, "categorical", categorical)
        seen: dict[str, str] = {}
        roles = (
            [(f.name, toml_key("numeric", f.name)) for f in numeric]
            + [(f.name, toml_key("categorical", f.name)) for f in categorical]
            + ([(self.text, "text")] if self.text is not None else [])
            + [(self.label, "label")]
        )
        for name, key in roles:
            if name in seen:
                raise SchemaError(
                    f"key '{key}': column {name!r} is already used by '{seen[name]}'; "
                    "a column can have only one role"
                )
            seen[name] = key

    def columns(self) -> tuple[str, ...]:
        """Every column a site's file must have: features, text, then the label."""
        return (
            tuple(f.name for f in self.numeric)
            + tuple(f.name for f in self.categorical)
            + ((self.text,) if self.text is not None else ())
            + (self.label,)
        )

    def category_sizes(self) -> tuple[int, ...]:
        """Embedding table size per categorical feature: one extra slot (0) for unseen values."""
        return tuple(len(f.categories) + 1 for f in self.categorical)


def _check_name(name: object, table: str) -> None:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"key '{table}': column names must be non-empty strings, got {name!r}")


def _check_unique(values: Sequence[str], key: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise SchemaError(f"key '{key}': {value!r} is listed twice; remove the duplicate")
        seen.add(value)


# ------------------------------------------------------------------------------- load/save


def load_schema(path: Path) -> Schema:
    """Read and fully validate a schema TOML file; any problem is one SchemaError line."""
    path = Path(path)
    name = path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SchemaError(
            f"{name}: schema file not found at {str(path)!r}; check the path "
            "or create one with infer_schema"
        ) from None
    except OSError as exc:
        raise SchemaError(
            f"{name}: cannot read the schema file ({exc.strerror}); check the path and permissions"
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SchemaError(
            f"{name}: not UTF-8 text (byte offset {exc.start}); re-save the file as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"{name}: not valid TOML ({exc}); fix the syntax there") from None
    try:
        return schema_from_dict(data)
    except SchemaError as exc:
        raise SchemaError(f"{name}: {exc}") from None


def schema_from_dict(data: Mapping[str, Any]) -> Schema:
    """Build a Schema from parsed TOML, rejecting unknown keys and wrong types.

    Unknown keys are errors rather than ignored because a misspelt key (``scales``) would
    otherwise silently fall back to something the federation never agreed on.
    """
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            raise SchemaError(
                f"key {key!r}: not a schema key (allowed: {', '.join(_TOP_LEVEL_KEYS)}); "
                "remove it or fix the spelling"
            )
    if "label" not in data:
        raise SchemaError("key 'label': missing; add label = \"<name of the label column>\"")
    label = _string(data["label"], "label")
    if "classes" not in data:
        raise SchemaError("key 'classes': missing; add classes = [\"<value>\", ...]")
    classes = _string_list(data["classes"], "classes")
    text = _string(data["text"], "text") if "text" in data else None

    numeric = []
    for col, spec in _table(data.get("numeric", {}), "numeric", "[numeric.<column>]").items():
        spec = _table(spec, toml_key("numeric", col), "with center and scale")
        _only_keys(spec, ("center", "scale"), toml_key("numeric", col))
        center = _number(
            spec,
            "center",
            toml_key("numeric", col),
            "a reference value for the column (a published norm)",
        )
        scale = _number(spec, "scale", toml_key("numeric", col), "the column's standard deviation")
        numeric.append(NumericFeature(col, center, scale))

    categorical = []
    for col, spec in _table(
        data.get("categorical", {}), "categorical", "[categorical.<column>]"
    ).items():
        spec = _table(spec, toml_key("categorical", col), "with categories")
        _only_keys(spec, ("categories",), toml_key("categorical", col))
        key = toml_key("categorical", col, "categories")
        if "categories" not in spec:
            raise SchemaError(f"key '{key}': missing; add categories = [\"<value>\", ...]")
        categorical.append(CategoricalFeature(col, tuple(_string_list(spec["categories"], key))))

    if not numeric and not categorical and text is None:
        raise SchemaError(
            "the schema has no features; add [numeric.<column>] or [categorical.<column>] "
            'tables, or text = "<column>"'
        )
    return Schema(label, tuple(classes), tuple(numeric), tuple(categorical), text)


def _string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise SchemaError(f"key '{key}': must be a non-empty string, got {value!r}")
    return value


def _string_list(value: object, key: str) -> list[str]:
    """Strings; integers are accepted and turned into strings (``classes = [0, 1]``)."""
    if not isinstance(value, list):
        raise SchemaError(f"key '{key}': must be a list of strings, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        else:
            raise SchemaError(f"key '{key}': {item!r} is not a string; quote it, e.g. \"{item}\"")
    return out


def _table(value: object, key: str, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"key '{key}': must be a table ({expected}), got {value!r}")
    return value


def _only_keys(spec: Mapping[str, Any], allowed: tuple[str, ...], key: str) -> None:
    for sub in spec:
        if sub not in allowed:
            raise SchemaError(
                f"key '{key}.{toml_key(sub)}': not allowed here (allowed: {', '.join(allowed)}); "
                "remove it or fix the spelling"
            )


def _number(spec: Mapping[str, Any], attr: str, key: str, hint: str) -> float:
    if attr not in spec:
        raise SchemaError(f"key '{key}.{attr}': missing; set it to {hint}")
    value = spec[attr]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"key '{key}.{attr}': must be a number, got {value!r}")
    return float(value)


def schema_to_dict(schema: Schema) -> dict[str, Any]:
    """Plain-data form (the TOML layout); ``schema_from_dict`` inverts it."""
    data: dict[str, Any] = {"label": schema.label, "classes": list(schema.classes)}
    if schema.text is not None:
        data["text"] = schema.text
    if schema.numeric:
        data["numeric"] = {f.name: {"center": f.center, "scale": f.scale} for f in schema.numeric}
    if schema.categorical:
        data["categorical"] = {
            f.name: {"categories": list(f.categories)} for f in schema.categorical
        }
    return data


_HEADER = """\
# Confide data schema: every site's file is checked and encoded with it.
# numeric.<column>: encoded as (value - center) / scale.
# categorical.<column>: encoded as 1 + position in categories; 0 = a value not listed.
# The order of the tables is the order of the model's inputs.
# center/scale and categories are reference values (published norms, code lists) typed by the
# operator, never statistics of one site's records: this file is shared with the federation.
"""


def dump_schema(schema: Schema) -> str:
    """TOML text in the documented layout, with short lists kept on one line for reading."""
    lines = [f"label = {_toml_value(schema.label)}", _toml_list("classes", schema.classes)]
    if schema.text is not None:
        lines.append(f"text = {_toml_value(schema.text)}")
    for feature in schema.numeric:
        lines += [
            "",
            f"[{toml_key('numeric', feature.name)}]",
            f"center = {_toml_value(feature.center)}",
            f"scale = {_toml_value(feature.scale)}",
        ]
    for cat in schema.categorical:
        lines += ["", f"[{toml_key('categorical', cat.name)}]"]
        lines.append(_toml_list("categories", cat.categories))
    return "\n".join(lines) + "\n"


def _toml_value(value: str | float) -> str:
    return tomli_w.dumps({"k": value})[4:-1]


def _toml_list(key: str, values: Sequence[str]) -> str:
    items = [_toml_value(v) for v in values]
    one_line = f"{key} = [{', '.join(items)}]"
    if len(one_line) <= 100:
        return one_line
    return f"{key} = [\n" + "".join(f"    {item},\n" for item in items) + "]"


def save_schema(schema: Schema, path: Path) -> None:
    """Write atomically, so a crash never leaves a half-written schema for sites to load."""
    path = Path(path)
    content = _HEADER + "\n" + dump_schema(schema)
    # A schema is shared: an existing file keeps its mode, a new one gets normal permissions.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    write_atomically(path, content.encode("utf-8"), mode)
