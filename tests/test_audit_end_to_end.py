"""`confide audit` through Flower's simulation engine (real ServerApp and ClientApp), and its
one-line refusals of settings that cannot give a valid bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.audit import DIRECTION_MEMORY, TOTAL_CANARIES, audit_scenario, trained_weights
from simulations.scenario import load_scenario
from tests.test_accountant_crosscheck import assert_ledger_matches_pld

AUDIT_KEYS = {
    "claimed_epsilon", "delta", "epsilon_lower_bound", "confidence", "canaries", "guesses",
    "correct", "kind",
}  # fmt: skip


def confide(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from confide.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_white_box_audit_of_a_dp_federation_stays_below_its_claim(tmp_path):
    done = confide(
        "audit", "heart", "--set", "dp=true", "--set", "target-epsilon=8", "--rounds", "2",
        "--out", str(tmp_path), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert AUDIT_KEYS <= set(audit)
    assert audit["kind"] == "white-box-gradient" and audit["canaries"] == 8000
    assert audit["method"] == "f-dp-2025"
    assert audit["epsilon_lower_bound"] <= audit["claimed_epsilon"] <= 8.01
    report = (tmp_path / "report.md").read_text()
    assert "## Privacy audit" in report and (tmp_path / "audit_scores.png").is_file()
    for ledger in (tmp_path / "privacy-ledgers").glob("*.json"):
        assert_ledger_matches_pld(ledger)


@pytest.mark.slow
def test_an_audit_without_dp_runs_and_says_the_bound_stands_alone(tmp_path):
    done = confide("audit", "heart", "--rounds", "1", "--out", str(tmp_path), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "no claimed epsilon: the bound stands alone" in done.stdout
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["kind"] == "black-box-input" and audit["claimed_epsilon"] is None


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--confidence", "1.5"], "confidence"),
        (["--kind", "black-box-input", "--canaries", "5000"], "--canaries 5000"),
        (["--set", "dp=true", "--set", "target-delta=0.01"], "smaller target-delta"),
        (["--kind", "white-box-gradient"], "dp = true"),
    ],
)
def test_impossible_settings_get_one_line_naming_the_fix(tmp_path: Path, args, named):
    done = confide("audit", "heart", "--out", str(tmp_path), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_white_box_canaries_default_to_what_a_sites_memory_allows():
    text = load_scenario("medical-text", {"dp": True})
    capped = audit_scenario(text, None, None, 0.95).config.audit_canaries
    assert capped == DIRECTION_MEMORY // (4 * trained_weights(text.config))
    assert capped < TOTAL_CANARIES // 5  # medical-text has 5 sites
    heart = audit_scenario(load_scenario("heart", {"dp": True}), None, None, 0.95)
    assert heart.config.audit_canaries == TOTAL_CANARIES // 4
