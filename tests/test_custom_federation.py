"""A federation on a bank's own file and schema, as an operator runs it: one command on the
coordinator (`confide coordinator run --schema FILE`), real processes on 127.0.0.1."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from tests.deployment_fixtures import (
    Background,
    assert_nothing_left,
    confide,
    make_federation,
    require_nginx,
    wait_for,
)

BANK_RECORDS = Path(__file__).resolve().parents[1] / "data/uci_bank_marketing/bank-full.csv.gz"


def write_bank_file(path: Path, rows: int = 600) -> Path:
    """A bank's own export: its own columns (semicolon-separated source, written as CSV)."""
    with gzip.open(BANK_RECORDS, "rt") as source:
        reader = csv.DictReader(source, delimiter=";")
        columns = [c for c in reader.fieldnames or [] if c != "duration"]
        records = [row for _, row in zip(range(rows), reader, strict=False)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.mark.slow
def test_a_custom_schema_federation_is_one_command_on_the_coordinator(tmp_path):
    require_nginx()
    fed = make_federation(tmp_path)
    try:
        fed.launch_coordinator()  # the bank prepares its file and schema while it boots
        data = write_bank_file(tmp_path / "bank-own.csv")
        schema = tmp_path / "bank.schema.toml"
        inferred = confide(
            "schema", "infer", str(data), "--label", "y", "--out", str(schema), "--list-categories"
        )
        assert inferred.returncode == 0, inferred.stderr
        fed.wait_for_coordinator()
        join = fed.join_args(
            "bank-1", **{"--role": "bank", "--task": "", "--schema": str(schema),
                         "--data": str(data)}
        )  # fmt: skip
        site = Background(join, tmp_path / "join-bank-1.log")
        fed.sites["bank-1"] = site
        wait_for(lambda: "joined as node" in site.output() or not site.alive(), 300, "bank-1")
        assert "joined as node" in site.output(), site.output()[-2000:]
        run = confide(
            "coordinator", "run", "--state", str(fed.state), "--schema", str(schema),
            "--rounds", "1", "--clients", "1", "--set", "local-epochs=1",
            "--out", str(tmp_path / "run"), "--quiet", "--wait-timeout", "120", timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert metrics["config"]["task"] == "custom"
        (client,) = metrics["rounds"][-1]["clients"]
        assert client["name"] == "bank-1" and 0 <= client["accuracy"] <= 1
        log = (tmp_path / "nodes" / "bank-1" / "supernode.log").read_text()
        assert "\x1b[" not in log  # no colour codes in a file
        assert re.search(r"^INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", log, re.MULTILINE), log[:500]
    finally:
        fed.stop()
        assert_nothing_left(str(tmp_path))
