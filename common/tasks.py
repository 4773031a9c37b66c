"""The bundled tasks (real, openly licensed data shipped in `data/`) and user-supplied ones.

A task is a schema plus records. Every record set goes through the same `encode_rows` that validates a
hospital's own file, so the bundled demos exercise exactly the path a real site takes.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from common.hf_model import hf_text_encoder
from common.run_config import PROJECT_ROOT, RunConfig
from common.schema import Schema, load_schema
from common.site_data import EncodedDataset, encode_rows, read_table


def _installed_checkout() -> Path | None:
    """The source tree of the Confide installed in this environment, if installed editable (as
    `make setup` does): pip records it in the distribution's direct_url.json (PEP 610)."""
    try:
        record = importlib.metadata.distribution("confide").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    url = json.loads(record or "{}").get("url", "")
    return Path(url2pathname(urlparse(url).path)) if url.startswith("file:") else None


def _has_bundled_records(root: Path) -> bool:
    return any(root.glob("data/*/*.csv*"))  # CSV files never travel in an app package


def _bundled_data_dir() -> Path:
    """data/ of the checkout this code lies in, unless Flower runs it from an app package (`flwr
    run` installs one under $FLWR_HOME/apps). Flower 1.42 packs only code and text (`*.py`,
    `*.toml`, `*.md`, `*.json`...; `fab-include` cannot add other kinds), so the bundled records
    stay behind and the installed checkout provides them."""
    if _has_bundled_records(PROJECT_ROOT):
        return PROJECT_ROOT / "data"
    installed = _installed_checkout()
    root = installed if installed and _has_bundled_records(installed) else PROJECT_ROOT
    return root / "data"


DATA_DIR = _bundled_data_dir()

HEART_SITES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}
HEART_COLUMNS = (
    "age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca thal num".split()
)
HEART_DROPPED = ("slope", "ca", "thal")  # mostly missing outside Cleveland (as FLamby does)

BUNDLED_SCHEMAS = {
    "heart": DATA_DIR / "uci_heart_disease" / "schema.toml",
    "bank": DATA_DIR / "uci_bank_marketing" / "schema.toml",
    "banking77": DATA_DIR / "banking77" / "schema.toml",
    "medical-text": DATA_DIR / "medical_abstracts_tc" / "schema.toml",
}

# The role a task's clients play, used to name them ("hospital-3", "bank-12").
TASK_ROLES = {"heart": "hospital", "medical-text": "hospital", "bank": "bank", "banking77": "bank"}


@dataclass(frozen=True)
class TaskData:
    name: str
    schema: Schema
    rows: tuple[dict[str, str], ...]  # kept for natural splits by any column
    dataset: EncodedDataset

    def column(self, name: str) -> np.ndarray | None:
        """A column's values as strings, or None when the task's records have no such column."""
        if not self.rows or name not in self.rows[0]:
            return None
        return np.array([row[name] for row in self.rows])


def load_heart_rows() -> list[dict[str, str]]:
    """Four real hospitals; FLamby's cleaning: drop slope/ca/thal, then rows with '?'."""
    rows = []
    for site, file_name in HEART_SITES.items():
        with (DATA_DIR / "uci_heart_disease" / file_name).open(encoding="ascii") as handle:
            for values in csv.reader(handle):
                record = dict(zip(HEART_COLUMNS, values, strict=True))
                for column in HEART_DROPPED:
                    del record[column]
                if "?" in record.values():
                    continue
                record = {k: _integral(v) for k, v in record.items()}
                record["disease"] = "1" if float(record.pop("num")) > 0 else "0"
                record["hospital"] = site
                rows.append(record)
    return rows


def _integral(value: str) -> str:
    """Cleveland writes '1.0' where the other sites write '1': one spelling per category."""
    number = float(value)
    return str(int(number)) if number.is_integer() else value


def task_schema(config: RunConfig) -> Schema:
    """The schema every site's file must follow (a real site loads only this, not the demo data)."""
    return load_schema(_schema_path(config.task, config.schema_file))


def _schema_path(task: str, schema_file: str) -> Path:
    return BUNDLED_SCHEMAS.get(task) or Path(schema_file)


def load_task(config: RunConfig) -> TaskData:
    """Read and encode a task once per process: simulation workers reuse it for every client."""
    split_column = config.partition_column if config.partitioner == "natural" else ""
    return _load_task(
        config.task,
        config.data_file,
        config.schema_file,
        split_column,
        config.vocab_size,
        config.max_length,
        config.model,
    )


@lru_cache(maxsize=4)
def _load_task(
    task: str,
    data_file: str,
    schema_file: str,
    split_column: str,
    vocab_size: int,
    max_length: int,
    model: str,
) -> TaskData:
    encoding = {
        "vocab_size": vocab_size,
        "max_length": max_length,
        "text_encoder": hf_text_encoder(model, max_length),
    }
    schema = load_schema(_schema_path(task, schema_file))
    if task == "heart":
        rows = load_heart_rows()
    elif task == "bank":
        rows = read_table(DATA_DIR / "uci_bank_marketing" / "bank-full.csv.gz")
    elif task == "banking77":
        rows = read_table(DATA_DIR / "banking77" / "train.csv")
    elif task == "medical-text":
        rows = read_table(DATA_DIR / "medical_abstracts_tc" / "medical_tc_test.csv.gz")
    else:
        rows = read_table(Path(data_file))
    # Bundled files carry columns the schema leaves out on purpose (bank's leaky `duration`); a
    # user's file may only add the column it is split by.
    if task == "custom":
        ignore = {split_column} - {""}
    else:
        ignore = set(rows[0]) - set(schema.columns())
    source = Path(data_file).name if task == "custom" else task
    dataset = encode_rows(rows, schema, source, ignore=ignore, **encoding)
    return TaskData(task, schema, tuple(rows), dataset)


CENTRAL_TEST_FILES = {"banking77": DATA_DIR / "banking77" / "test.csv"}


def load_central_test(config: RunConfig) -> EncodedDataset | None:
    """A published test split the coordinator may evaluate on; no client's records are in it."""
    path = CENTRAL_TEST_FILES.get(config.task)
    if path is None:
        return None
    return encode_rows(
        read_table(path),
        task_schema(config),
        path.name,
        vocab_size=config.vocab_size,
        max_length=config.max_length,
        text_encoder=hf_text_encoder(config.model, config.max_length),
    )
