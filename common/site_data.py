"""Read one site's data file and encode it with the federation's schema.

Site operators are not ML engineers and cannot send their data to someone who is, so every
problem in a file is reported at once, one line each, naming the file, row, column, value
and the fix, instead of stopping at the first one with a traceback.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import math
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.schema import Schema
from common.text_tokenizer import encode_texts

MAX_SHOWN = 20
"""Problems shown in ``str(DataFileError)``; the rest are counted."""

EXAMPLES_PER_KIND = 5
"""Row-level problems listed per column before the rest are summarised, so one bad column
in a large file cannot push every other problem out of the message."""

_DELIMITERS = (",", ";", "\t")
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab"}


TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # texts -> ids, mask


class DataFileError(ValueError):
    """All problems in one data file, listed at once; each names file, row, column and fix."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(self._render())

    def __reduce__(self) -> tuple[Any, ...]:
        # Flower/Ray may pickle errors across processes; the default would pass only args.
        return (type(self), (self.source, self.problems))

    def _render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        count = len(self.problems)
        lines = [f"{self.source}: {count} problems; fix them and try again:"]
        lines += [f"  {p}" for p in self.problems[:MAX_SHOWN]]
        if count > MAX_SHOWN:
            lines.append(f"  ... and {count - MAX_SHOWN} more")
        return "\n".join(lines)


class _Problems:
    """Collects problems; row-level ones of the same kind are capped and summarised."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._items: list[tuple[object, str]] = []
        self._seen: Counter[object] = Counter()
        self._summaries: dict[object, str] = {}

    def add(self, message: str, kind: object = None, summary: str = "") -> None:
        """``summary`` is formatted with ``n`` (rows not listed) once the kind is capped."""
        if kind is not None:
            self._seen[kind] += 1
            self._summaries.setdefault(kind, summary)
            if self._seen[kind] > EXAMPLES_PER_KIND:
                return
        self._items.append((kind, message))

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        if not self._items:
            return
        out: list[str] = []
        listed: Counter[object] = Counter()
        for kind, message in self._items:
            out.append(message)
            if kind is None:
                continue
            listed[kind] += 1
            hidden = self._seen[kind] - EXAMPLES_PER_KIND
            if listed[kind] == EXAMPLES_PER_KIND and hidden > 0:
                out.append(self._summaries[kind].format(n=hidden))
        raise DataFileError(self.source, out)


def _show(value: str, limit: int = 40) -> str:
    """A value quoted and escaped onto one line, shortened if long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --------------------------------------------------------------------------------- reading


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a .csv/.tsv/.jsonl file (optionally .gz) as column -> string value.

    Raises DataFileError for anything wrong with the file itself; checking the values
    against a schema is ``encode_rows``' job.
    """
    return read_table_numbered(path)[0]


def read_table_numbered(path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """``read_table`` plus each row's number in the file, for messages.

    A row's number is the line it starts on, so the header is row 1 in a CSV file and
    the number matches what an editor shows (also for JSONL, which has no header).
    """
    path = Path(path)
    source = path.name
    kind, compressed = _file_kind(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        _fail(source, f"file not found at {str(path)!r}; check the path")
    except IsADirectoryError:
        _fail(source, f"{str(path)!r} is a directory, not a data file; give the file's path")
    except OSError as exc:
        _fail(source, f"cannot read the file ({exc.strerror}); check the path and permissions")
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            _fail(source, f"not a valid gzip file ({exc}); re-compress it or remove the .gz")
    text = _decode(raw, source, compressed)
    if not text.strip():
        what = "a header line with column names" if kind == "csv" else "one JSON object per line"
        _fail(source, f"the file is empty; expected {what} followed by data rows")
    if kind == "csv":
        return _parse_csv(text, source)
    return _parse_jsonl(text, source)


def _fail(source: str, message: str) -> Any:
    raise DataFileError(source, [f"{source}: {message}"])


def _file_kind(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix in (".csv", ".tsv"):
        return "csv", compressed
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl", compressed
    hint = {
        ".xlsx": "export it from the spreadsheet as 'CSV UTF-8'",
        ".xls": "export it from the spreadsheet as 'CSV UTF-8'",
        ".json": "write one JSON object per line and name the file .jsonl",
        ".parquet": "convert it to .csv or .jsonl",
    }.get(suffix, "save the data as .csv or .jsonl (optionally gzipped, .csv.gz/.jsonl.gz)")
    return _fail(path.name, f"unsupported file type {suffix or '(no extension)'!r}; {hint}")


def _decode(raw: bytes, source: str, compressed: bool) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        _fail(source, "the file is UTF-16 text; re-save it as UTF-8 (in Excel: 'CSV UTF-8')")
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        where = " of the decompressed data" if compressed else ""
        return _fail(
            source,
            f"not UTF-8 text: byte 0x{raw[offset]:02x} at byte offset {offset}{where} "
            f"(line {line}) is invalid; re-save the file as UTF-8 (in Excel: 'CSV UTF-8')",
        )


def _detect_delimiter(line: str) -> str:
    """The candidate that splits the header into the most fields (ties: comma).

    Only the header is looked at: its names rarely contain delimiters, while free-text
    values often contain all three, which is what trips up ``csv.Sniffer``.
    """
    best, best_fields = ",", 1
    for delimiter in _DELIMITERS:
        fields = len(next(csv.reader([line], delimiter=delimiter), []))
        if fields > best_fields:
            best, best_fields = delimiter, fields
    return best


def _parse_csv(text: str, source: str) -> tuple[list[dict[str, str]], list[int]]:
    first_line = next(line for line in text.splitlines() if line.strip())
    delimiter = _detect_delimiter(first_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    problems = _Problems(source)
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    numbers: list[int] = []
    end = 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if all(not field.strip() for field in record):
                continue  # blank lines and spreadsheet rows of empty cells
            if header is None:
                header = [name.strip() for name in record]
                _check_header(header, start, source, problems)
                continue
            if len(record) != len(header):
                problems.add(
                    f"{source}: row {start}: has {len(record)} fields but the header has "
                    f"{len(header)}; look for a {_DELIMITER_NAMES[delimiter]} inside a value "
                    "that is not in double quotes, or a missing value",
                    kind="ragged",
                    summary=f"{source}: ... and {{n}} more rows with the wrong number of fields",
                )
                continue
            rows.append(dict(zip(header, record, strict=True)))
            numbers.append(start)
    except csv.Error as exc:
        problems.add(f"{source}: row {end + 1}: cannot be parsed as CSV ({exc}); check quoting")
    problems.raise_if_any()
    if not rows:
        _fail(source, "the file has a header but no data rows; add the data below the header")
    return rows, numbers


def _check_header(header: list[str], line: int, source: str, problems: _Problems) -> None:
    for position, name in enumerate(header, 1):
        if not name:
            problems.add(
                f"{source}: row {line} (header): column {position} has no name; "
                "name it, or delete the column if it is empty"
            )
    for name, count in Counter(header).items():
        if name and count > 1:
            problems.add(
                f"{source}: row {line} (header): column name {_show(name)} appears {count} "
                "times; give each column a different name"
            )


def _parse_jsonl(text: str, source: str) -> tuple[list[dict[str, str]], list[int]]:
    if text.lstrip().startswith("["):
        _fail(source, "the file is a JSON array, not JSON Lines; write one JSON object per line")
    problems = _Problems(source)
    rows: list[dict[str, str]] = []
    numbers: list[int] = []
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called last for the outermost object, so ``duplicates`` ends up describing it.
        duplicates[:] = sorted(k for k, c in Counter(k for k, _ in pairs).items() if c > 1)
        return dict(pairs)

    summary = f"{source}: ... and {{n}} more lines that are not JSON objects"
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        duplicates.clear()
        try:
            obj = json.loads(line, object_pairs_hook=pairs_hook)
        except json.JSONDecodeError as exc:
            problems.add(
                f"{source}: row {number}: not valid JSON ({exc.msg} at character {exc.colno}); "
                "each line must be one complete JSON object",
                kind="json",
                summary=summary,
            )
            continue
        except (ValueError, RecursionError) as exc:
            problems.add(
                f"{source}: row {number}: cannot be read as JSON ({exc}); fix the value",
                kind="json",
                summary=summary,
            )
            continue
        if not isinstance(obj, dict):
            problems.add(
                f"{source}: row {number}: expected a JSON object {{...}}, got "
                f"{type(obj).__name__} {_show(line)}; write one object per line",
                kind="json",
                summary=summary,
            )
            continue
        if duplicates:
            problems.add(
                f"{source}: row {number}: key(s) {duplicates} appear more than once; "
                "keep one of each"
            )
            continue
        rows.append({key: _json_value(value) for key, value in obj.items()})
        numbers.append(number)
    problems.raise_if_any()
    return rows, numbers


def _json_value(value: Any) -> str:
    """Values as the text a CSV would hold, so both formats encode the same way."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


# -------------------------------------------------------------------------------- encoding


@dataclass(frozen=True, eq=False)
class EncodedDataset:
    """Model inputs in forward order plus int64 labels, all with the same first dimension.

    Tabular: ``(numeric float32 [N, F], categorical int64 [N, C])``. Text:
    ``(token_ids int64 [N, T], mask bool [N, T])``, followed by the two tabular arrays
    when the schema also has numeric or categorical features.
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        for array in self.inputs:
            if array.shape[:1] != self.labels.shape:
                raise ValueError(
                    f"every input needs {len(self.labels)} rows, got shape {array.shape}"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> EncodedDataset:
        """Rows at ``indices`` (integer positions or a boolean mask), e.g. a train split."""
        idx = np.asarray(indices)
        if idx.size == 0 and idx.dtype != bool:
            idx = idx.astype(np.int64)
        return EncodedDataset(tuple(a[idx] for a in self.inputs), self.labels[idx])


def encode_rows(
    rows: Sequence[Mapping[str, str]],
    schema: Schema,
    source: str,
    *,
    vocab_size: int = 8192,
    max_length: int = 64,
    ignore: Collection[str] = (),
    row_numbers: Sequence[int] | None = None,
    text_encoder: TextEncoder | None = None,
) -> EncodedDataset:
    """Check every row and column against ``schema`` and encode; one error lists all problems.

    Columns in the file but not in the schema are errors unless listed in ``ignore``,
    because silently dropping them would hide a file that does not match what the
    federation agreed on. Values a categorical feature does not list encode as 0.
    ``row_numbers`` are the rows' numbers for messages (default: header is row 1).
    ``text_encoder`` replaces the hashing tokenizer (a Hugging Face model's own: common/hf_model.py).
    """
    problems = _Problems(source)
    count = len(rows)
    if count == 0:
        _fail(source, "no data rows; add the data below the header")
    numbers = list(range(2, count + 2)) if row_numbers is None else list(row_numbers)
    if len(numbers) != count:
        raise ValueError(f"row_numbers has {len(numbers)} entries for {count} rows")

    expected = schema.columns()
    present: Counter[str] = Counter()
    for row in rows:
        present.update(row.keys())
    for col in expected:
        if not present[col]:
            problems.add(
                f"{source}: column {_show(col)} is missing; the schema needs columns "
                f"{list(expected)}; add it, or ask the federation to change the schema"
            )
    ignored = set(ignore)
    for col in present:
        if col not in expected and col not in ignored:
            problems.add(
                f"{source}: column {_show(col)} is not in the schema; remove it from the file "
                "or list it as ignored"
            )

    def cells(col: str) -> list[tuple[int, str]]:
        """(row index, value) of every row that has ``col``; reports rows lacking it."""
        if not present[col]:
            return []
        out = []
        for i, row in enumerate(rows):
            value = row.get(col)
            if value is None:
                problems.add(
                    f"{source}: row {numbers[i]}: column {_show(col)} is missing; add it",
                    kind=(col, "value"),
                    summary=f"{source}: column {_show(col)}: ... and {{n}} more rows with "
                    "a problem in this column",
                )
            else:
                out.append((i, value))
        return out

    numeric = np.zeros((count, len(schema.numeric)), dtype=np.float32)
    for j, feature in enumerate(schema.numeric):
        column = np.zeros(count, dtype=np.float64)
        for i, value in cells(feature.name):
            number = _parse(value)
            if isinstance(number, str):
                problems.add(
                    f"{source}: row {numbers[i]}, column {_show(feature.name)}: {number}",
                    kind=(feature.name, "value"),
                    summary=f"{source}: column {_show(feature.name)}: ... and {{n}} more rows "
                    "with a problem in this column",
                )
            else:
                column[i] = (number - feature.center) / feature.scale
        with np.errstate(over="ignore", invalid="ignore"):
            numeric[:, j] = column
        for i in np.flatnonzero(~np.isfinite(numeric[:, j])):
            problems.add(
                f"{source}: row {numbers[i]}, column {_show(feature.name)}: "
                f"{_show(rows[i][feature.name])} is too large once scaled; check the value "
                "and its unit",
                kind=(feature.name, "value"),
                summary=f"{source}: column {_show(feature.name)}: ... and {{n}} more rows with "
                "a problem in this column",
            )

    categorical = np.zeros((count, len(schema.categorical)), dtype=np.int64)
    for j, feature in enumerate(schema.categorical):
        codes = {category: k for k, category in enumerate(feature.categories, 1)}
        for i, value in cells(feature.name):
            categorical[i, j] = codes.get(value.strip(), 0)

    texts = [""] * count
    if schema.text is not None:
        for i, value in cells(schema.text):
            texts[i] = value

    labels = np.zeros(count, dtype=np.int64)
    class_index = {name: k for k, name in enumerate(schema.classes)}
    allowed = ", ".join(_show(c) for c in schema.classes[:10])
    if len(schema.classes) > 10:
        allowed += f", ... ({len(schema.classes)} in all)"
    for i, value in cells(schema.label):
        index = class_index.get(value.strip())
        if index is None:
            problems.add(
                f"{source}: row {numbers[i]}, column {_show(schema.label)}: label "
                f"{_show(value)} is not a class of the schema (allowed: {allowed}); fix the "
                "value, or ask the federation to add the class",
                kind=(schema.label, "value"),
                summary=f"{source}: column {_show(schema.label)}: ... and {{n}} more rows with "
                "a problem in this column",
            )
        else:
            labels[i] = index

    problems.raise_if_any()
    tabular = (numeric, categorical)
    if schema.text is None:
        return EncodedDataset(tabular, labels)
    if text_encoder is None:
        ids, mask = encode_texts(texts, vocab_size=vocab_size, max_length=max_length)
    else:
        ids, mask = text_encoder(texts)
    extra = tabular if schema.numeric or schema.categorical else ()
    return EncodedDataset((ids, mask, *extra), labels)


def _parse(value: str) -> float | str:
    """The number in ``value``, or the reason it is not one (for the message)."""
    stripped = value.strip()
    if not stripped:
        return "empty value; fill in a number (the schema says this column is numeric)"
    try:
        number = float(stripped)
    except ValueError:
        hint = ""
        if "," in stripped and "." not in stripped:
            try:
                float(stripped.replace(",", "."))
                hint = " (write decimals with '.', not ',')"
            except ValueError:
                pass
        return (
            f"{_show(value)} is not a number{hint}; fix the value or mark the column "
            "categorical in the schema"
        )
    if not math.isfinite(number):
        return f"{_show(value)} is not a finite number; replace it with a real value"
    return number


def load_site_data(path: Path, schema: Schema, **kwargs: Any) -> EncodedDataset:
    """``read_table`` + ``encode_rows``, with row numbers as they appear in the file.

    Keyword arguments go to ``encode_rows`` (vocab_size, max_length, ignore).
    """
    path = Path(path)
    rows, numbers = read_table_numbered(path)
    return encode_rows(rows, schema, path.name, row_numbers=numbers, **kwargs)
