"""Specifications for common.tasks: the bundled data sets as encoded, and user-supplied tasks.

Expected counts are recomputed from the raw files in data/ wherever that is possible, so a test fails
when the loader drops, duplicates or mislabels records rather than when a constant is retyped.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.run_config import PROJECT_ROOT, RunConfig
from common.schema import Schema, load_schema
from common.site_data import DataFileError, EncodedDataset
from common.tasks import (
    DATA_DIR,
    HEART_SITES,
    TaskData,
    load_central_test,
    load_task,
    task_schema,
)

HEART_DIR = DATA_DIR / "uci_heart_disease"
HEART_KEPT = [*range(10), 13]  # FLamby drops slope, ca and thal (columns 10-12)


def raw_heart_counts() -> dict[str, tuple[int, int]]:
    """(records kept, positives) per site, straight from the UCI files."""
    counts = {}
    for site, file_name in HEART_SITES.items():
        kept = positives = 0
        for line in (HEART_DIR / file_name).read_text(encoding="ascii").splitlines():
            if not line.strip():
                continue
            values = line.strip().split(",")
            if any(values[i] == "?" for i in HEART_KEPT):
                continue
            kept += 1
            positives += float(values[13]) > 0
        counts[site] = (kept, positives)
    return counts


def config_for(task: str, **settings: object) -> RunConfig:
    return RunConfig.from_mapping({"task": task, "partitioner": "iid", **settings})


# ------------------------------------------------------------------------------------ heart


@pytest.fixture(scope="module")
def heart() -> TaskData:
    return load_task(RunConfig.from_mapping({"task": "heart", "partitioner": "natural"}))


def test_heart_keeps_the_740_complete_records(heart: TaskData) -> None:
    assert len(heart.dataset) == 740
    assert sum(kept for kept, _ in raw_heart_counts().values()) == 740


def test_heart_records_per_hospital_match_the_raw_files(heart: TaskData) -> None:
    found = Counter(heart.column("hospital").tolist())
    assert found == {site: kept for site, (kept, _) in raw_heart_counts().items()}


def test_heart_positives_per_hospital_match_the_raw_files(heart: TaskData) -> None:
    hospitals = heart.column("hospital")
    positive = heart.schema.classes.index("1")
    for site, (kept, positives) in raw_heart_counts().items():
        labels = heart.dataset.labels[hospitals == site]
        assert len(labels) == kept
        assert int((labels == positive).sum()) == positives, site


def test_heart_label_balance_is_plausible(heart: TaskData) -> None:
    # Cleveland is the balanced reference site: 139 of 303 have disease.
    hospitals = heart.column("hospital")
    cleveland = heart.dataset.labels[hospitals == "cleveland"]
    assert 0.4 < cleveland.mean() < 0.5
    assert 0.4 < heart.dataset.labels.mean() < 0.65


def test_heart_drops_the_columns_missing_outside_cleveland(heart: TaskData) -> None:
    for column in ("slope", "ca", "thal", "num"):
        assert column not in heart.rows[0]
    assert {"disease", "hospital"} <= set(heart.rows[0])


def test_heart_inputs_are_the_schema_features(heart: TaskData) -> None:
    numeric, categorical = heart.dataset.inputs
    assert numeric.shape == (740, len(heart.schema.numeric))
    assert categorical.shape == (740, len(heart.schema.categorical))
    assert np.isfinite(numeric).all()


def test_heart_categories_are_spelled_alike_across_sites(heart: TaskData) -> None:
    # Cleveland writes '1.0' where the others write '1'; code 0 would mean "not a listed value".
    _, categorical = heart.dataset.inputs
    assert (categorical > 0).all()


def test_heart_has_no_central_test_set() -> None:
    assert load_central_test(RunConfig.from_mapping({"task": "heart"})) is None


# ------------------------------------------------------------------------------------- bank


@pytest.fixture(scope="module")
def bank() -> TaskData:
    return load_task(config_for("bank"))


def raw_bank_rows() -> list[dict[str, str]]:
    path = DATA_DIR / "uci_bank_marketing" / "bank-full.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


def test_bank_has_every_record_and_positive_of_the_raw_file(bank: TaskData) -> None:
    raw = raw_bank_rows()
    assert len(raw) == 45_211
    assert len(bank.dataset) == len(raw)
    positive = bank.schema.classes.index("yes")
    assert int((bank.dataset.labels == positive).sum()) == sum(r["y"] == "yes" for r in raw)


def test_bank_duration_is_in_the_file_but_not_a_model_input(bank: TaskData) -> None:
    assert "duration" in bank.rows[0]
    assert "duration" not in bank.schema.columns()
    numeric, categorical = bank.dataset.inputs
    assert numeric.shape[1] == len(bank.schema.numeric)
    assert categorical.shape[1] == len(bank.schema.categorical)
    assert numeric.shape[1] + categorical.shape[1] == len(bank.schema.columns()) - 1


def test_bank_has_no_central_test_set() -> None:
    assert load_central_test(config_for("bank")) is None


# -------------------------------------------------------------------------------- banking77


@pytest.fixture(scope="module")
def banking77_config() -> RunConfig:
    return config_for("banking77", **{"max-length": 32})


@pytest.fixture(scope="module")
def banking77(banking77_config: RunConfig) -> TaskData:
    return load_task(banking77_config)


@pytest.fixture(scope="module")
def banking77_test(banking77_config: RunConfig) -> EncodedDataset | None:
    return load_central_test(banking77_config)


def test_banking77_has_77_classes_all_present_in_training_data(banking77: TaskData) -> None:
    assert len(banking77.schema.classes) == 77
    assert set(np.unique(banking77.dataset.labels)) == set(range(77))


def test_banking77_train_rows_match_the_file(banking77: TaskData) -> None:
    with (DATA_DIR / "banking77" / "train.csv").open(encoding="utf-8", newline="") as handle:
        assert len(banking77.dataset) == len(list(csv.DictReader(handle)))


def test_banking77_inputs_are_tokens_and_mask_of_max_length(
    banking77: TaskData, banking77_config: RunConfig
) -> None:
    ids, mask = banking77.dataset.inputs
    assert ids.shape == mask.shape == (len(banking77.dataset), banking77_config.max_length)
    assert mask.dtype == bool
    assert mask[:, 0].all(), "every message has at least one token"
    assert ids.max() < banking77_config.vocab_size


def test_banking77_central_test_has_3080_rows_over_all_77_classes(
    banking77_test: EncodedDataset,
) -> None:
    assert len(banking77_test) == 3_080
    assert set(np.unique(banking77_test.labels)) == set(range(77))


def test_banking77_central_test_is_encoded_like_the_clients_data(
    banking77: TaskData, banking77_test: EncodedDataset
) -> None:
    assert [a.shape[1:] for a in banking77_test.inputs] == [
        a.shape[1:] for a in banking77.dataset.inputs
    ]


# ----------------------------------------------------------------------------- medical-text


def test_medical_text_has_2888_rows_over_5_classes() -> None:
    task = load_task(config_for("medical-text"))
    assert len(task.dataset) == 2_888
    assert len(task.schema.classes) == 5
    assert set(np.unique(task.dataset.labels)) == set(range(5))


# ----------------------------------------------------------------------------------- custom

SCHEMA_TOML = """\
label = "outcome"
classes = ["no", "yes"]

[numeric.age]
center = 40.0
scale = 10.0

[categorical.colour]
categories = ["red", "blue"]
"""


@pytest.fixture
def custom_files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "patients.csv"
    data.write_text(
        "age,colour,outcome,site\n30,red,no,a\n50,blue,yes,b\n60,green,yes,a\n20,red,no,b\n",
        encoding="utf-8",
    )
    schema = tmp_path / "federation.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")
    return data, schema


def custom_config(files: tuple[Path, Path], **settings: object) -> RunConfig:
    data, schema = files
    return RunConfig.from_mapping(
        {"task": "custom", "data-file": str(data), "schema-file": str(schema), **settings}
    )


def test_custom_task_encodes_the_users_csv_with_their_schema(
    custom_files: tuple[Path, Path],
) -> None:
    config = custom_config(custom_files, partitioner="natural", **{"partition-column": "site"})
    task = load_task(config)
    numeric, categorical = task.dataset.inputs
    assert numeric[:, 0].tolist() == pytest.approx([-1.0, 1.0, 2.0, -2.0])
    assert categorical[:, 0].tolist() == [1, 2, 0, 1]  # green is not listed: 0
    assert task.dataset.labels.tolist() == [0, 1, 1, 0]


def test_custom_task_natural_split_is_by_the_partition_column(
    custom_files: tuple[Path, Path],
) -> None:
    config = custom_config(custom_files, partitioner="natural", **{"partition-column": "site"})
    assert load_task(config).column("site").tolist() == ["a", "b", "a", "b"]


def test_custom_task_rejects_extra_columns_it_is_not_split_by(
    custom_files: tuple[Path, Path],
) -> None:
    # Not split by `site`, so the file has a column the federation did not agree on.
    with pytest.raises(DataFileError, match="'site' is not in the schema"):
        load_task(custom_config(custom_files, partitioner="iid", **{"num-clients": 2}))


def test_custom_task_errors_name_the_users_file(tmp_path: Path) -> None:
    data = tmp_path / "site-7.csv"
    data.write_text("age,colour,outcome\nforty,red,no\n", encoding="utf-8")
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")
    with pytest.raises(DataFileError, match=r"^site-7\.csv: row 2, column 'age'"):
        load_task(custom_config((data, schema), partitioner="iid"))


def test_task_schema_of_custom_task_is_its_schema_file(custom_files: tuple[Path, Path]) -> None:
    schema = task_schema(custom_config(custom_files))
    assert isinstance(schema, Schema)
    assert schema == load_schema(custom_files[1])
    assert schema.columns() == ("age", "colour", "outcome")


def test_task_schema_of_bundled_task_ignores_schema_file(
    custom_files: tuple[Path, Path],
) -> None:
    config = RunConfig.from_mapping({"task": "heart", "schema-file": str(custom_files[1])})
    assert task_schema(config) == load_schema(HEART_DIR / "schema.toml")


def test_custom_task_has_no_central_test_set(custom_files: tuple[Path, Path]) -> None:
    assert load_central_test(custom_config(custom_files)) is None


def test_code_run_from_an_app_package_reads_the_installed_checkouts_data(tmp_path: Path) -> None:
    # `flwr run` installs the app package (code, no data records) under $FLWR_HOME/apps.
    package = tmp_path / "apps" / "confide.confide.0.1.0.0123abcd"
    shutil.copytree(PROJECT_ROOT / "common", package / "common")
    (package / "data" / "uci_heart_disease").mkdir(parents=True)  # READMEs and schemas travel
    shown = subprocess.run(
        [sys.executable, "-c", "from common.tasks import DATA_DIR; print(DATA_DIR)"],
        cwd=package,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(shown.stdout.strip()) == PROJECT_ROOT / "data"
