"""Specifications for common.privacy_ledger: epsilon that survives rounds, restarts, federations.

Real Opacus accountants and real processes; no mocks.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant

from common.privacy import PrivacyBudget, PrivacyConfigError, calibrate_noise_multiplier
from common.privacy_ledger import (
    BudgetExhausted,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    dataset_fingerprint,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
Q, STEPS = 0.02, 10
BUDGET = PrivacyBudget(target_epsilon=3.0, target_delta=DELTA, max_grad_norm=1.0)
FP_A = dataset_fingerprint([np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 1, 0])])
FP_B = dataset_fingerprint([np.ones((3, 4), dtype=np.float32), np.array([1, 1, 0])])
RECORD_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from common.privacy_ledger import LedgerEntry, PrivacyLedger
    path, fingerprint, run_id, first_round, rounds, sigma, q, steps = sys.argv[1:]
    ledger = PrivacyLedger.open(Path(path), fingerprint)
    for rnd in range(int(first_round), int(first_round) + int(rounds)):
        ledger.record(LedgerEntry(run_id, rnd, float(sigma), float(q), int(steps)))
    """
)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Optimal order is the largest alpha:UserWarning"  # Opacus' PRV domain bound, large sigma
)


def entry(server_round: int, sigma: float = 1.2, run_id: str = "run-1") -> LedgerEntry:
    return LedgerEntry(run_id, server_round, sigma, Q, STEPS)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "privacy-ledger.json"


def recorded_ledger(path: Path) -> Path:
    ledger = PrivacyLedger.open(path, FP_A)
    ledger.record(entry(1), budget=BUDGET)
    ledger.record(entry(2))
    return path


# ----------------------------------------------------------------------------- composition


def test_three_processes_compose_like_one_accountant(ledger_path: Path) -> None:
    sigmas = [1.1, 1.1, 1.3]
    for rnd, sigma in enumerate(sigmas, start=1):
        run_id = "federation-a" if rnd < 3 else "federation-b"
        args = [str(ledger_path), FP_A, run_id, str(rnd), "1", repr(sigma), repr(Q), str(STEPS)]
        subprocess.run(
            [sys.executable, "-c", RECORD_SCRIPT, *args], env=ENV, check=True, timeout=60
        )

    one_accountant = PRVAccountant()
    for sigma in sigmas:
        for _ in range(STEPS):
            one_accountant.step(noise_multiplier=sigma, sample_rate=Q)

    ledger = PrivacyLedger.open(ledger_path, FP_A)
    assert [e.server_round for e in ledger.entries()] == [1, 2, 3]
    assert ledger.epsilon_spent(DELTA, "prv") == pytest.approx(
        one_accountant.get_epsilon(DELTA), abs=1e-6
    )


def test_concurrent_processes_lose_no_rounds(ledger_path: Path) -> None:
    def args(i: int) -> list[str]:
        run_id, first_round, rounds, sigma = f"federation-{i}", "1", "5", "1.2"
        return [str(ledger_path), FP_A, run_id, first_round, rounds, sigma, repr(Q), str(STEPS)]

    processes = [
        subprocess.Popen([sys.executable, "-c", RECORD_SCRIPT, *args(i)], env=ENV) for i in range(3)
    ]
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0]
    entries = PrivacyLedger.open(ledger_path, FP_A).entries()
    assert sorted((e.run_id, e.server_round) for e in entries) == [
        (f"federation-{i}", rnd) for i in range(3) for rnd in range(1, 6)
    ]


def test_budget_calibrated_for_three_rounds_refuses_the_fourth(ledger_path: Path) -> None:
    sigma = calibrate_noise_multiplier(BUDGET, Q, STEPS, planned_rounds=3)
    ledger = PrivacyLedger.open(ledger_path, FP_A)
    for rnd in (1, 2, 3):
        assert ledger.check_round(BUDGET, sigma, Q, STEPS) <= 3.0
        ledger.record(entry(rnd, sigma))
    with pytest.raises(BudgetExhausted, match=r"epsilon 2\.\d\d of 3\.00 spent \(delta 1e-05\)"):
        ledger.check_round(BUDGET, sigma, Q, STEPS)


def test_check_round_counts_rounds_recorded_by_another_process(ledger_path: Path) -> None:
    stale = PrivacyLedger.open(ledger_path, FP_A)
    other = PrivacyLedger.open(ledger_path, FP_A)
    other.record(entry(1, sigma=0.5))
    other.record(entry(2, sigma=0.5))
    with pytest.raises(BudgetExhausted):
        stale.check_round(BUDGET, 0.5, Q, STEPS)


def test_charge_records_the_round_it_admits(ledger_path: Path) -> None:
    ledger = PrivacyLedger.open(ledger_path, FP_A)
    after = ledger.charge(BUDGET, entry(1))
    reopened = PrivacyLedger.open(ledger_path, FP_A)
    assert reopened.history() == [(1.2, Q, STEPS)]
    assert reopened.epsilon_spent(DELTA, "prv") == pytest.approx(after, abs=1e-9)


def test_a_different_budget_for_the_same_data_set_is_refused(ledger_path: Path) -> None:
    recorded_ledger(ledger_path)
    looser = PrivacyBudget(target_epsilon=8.0, target_delta=DELTA, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match=r"epsilon 3 at delta 1e-05"):
        PrivacyLedger.open(ledger_path, FP_A).check_round(looser, 1.2, Q, STEPS)


# ----------------------------------------------------------------------------- file handling


def test_missing_file_is_an_empty_ledger(ledger_path: Path) -> None:
    ledger = PrivacyLedger.open(ledger_path, FP_A)
    assert ledger.history() == []
    assert ledger.epsilon_spent(DELTA, "prv") == 0.0


def test_truncated_ledger_is_refused(ledger_path: Path) -> None:
    data = recorded_ledger(ledger_path).read_bytes()
    ledger_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError, match=r"privacy-ledger\.json.*refusing to train"):
        PrivacyLedger.open(ledger_path, FP_A)


def test_edited_number_is_refused(ledger_path: Path) -> None:
    text = recorded_ledger(ledger_path).read_text()
    assert '"noise_multiplier": 1.2' in text
    ledger_path.write_text(text.replace('"noise_multiplier": 1.2', '"noise_multiplier": 9.2', 1))
    with pytest.raises(LedgerError, match=r"edited or corrupted.*restore it from backup"):
        PrivacyLedger.open(ledger_path, FP_A)


def test_two_data_sets_in_one_file_are_kept_apart(ledger_path: Path) -> None:
    PrivacyLedger.open(ledger_path, FP_A).record(entry(1, sigma=1.1))
    PrivacyLedger.open(ledger_path, FP_B).record(entry(1, sigma=2.2, run_id="run-b"))
    PrivacyLedger.open(ledger_path, FP_A).record(entry(2, sigma=1.3))
    assert PrivacyLedger.open(ledger_path, FP_A).history() == [(1.1, Q, STEPS), (1.3, Q, STEPS)]
    assert PrivacyLedger.open(ledger_path, FP_B).history() == [(2.2, Q, STEPS)]


def test_atomic_write_leaves_no_temp_files(ledger_path: Path) -> None:
    recorded_ledger(ledger_path)
    names = sorted(p.name for p in ledger_path.parent.iterdir())
    assert names == [".privacy-ledger.json.lock", "privacy-ledger.json"]


def test_ledger_file_mode_is_0600(ledger_path: Path) -> None:
    old_umask = os.umask(0o000)
    try:
        recorded_ledger(ledger_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(ledger_path.stat().st_mode) == 0o600


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.text(alphabet='{}[]":,0123456789.-eE truefalsnl', max_size=200).map(str.encode),
    )
)
def test_random_bytes_as_ledger_raise_only_ledger_error(ledger_path: Path, data: bytes) -> None:
    ledger_path.write_bytes(data)
    with pytest.raises(LedgerError):
        PrivacyLedger.open(ledger_path, FP_A)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_depends_on_bytes_shape_and_dtype() -> None:
    x = np.arange(6, dtype=np.int64)
    fingerprints = {
        dataset_fingerprint([x]),
        dataset_fingerprint([x.reshape(2, 3)]),
        dataset_fingerprint([x.astype(np.int32)]),
        dataset_fingerprint([x + 1]),
        dataset_fingerprint([x[:3], x[3:]]),
    }
    assert len(fingerprints) == 5
    assert dataset_fingerprint([x.copy()]) == dataset_fingerprint([x])


# ----------------------------------------------------------------------------- summary


def test_summary_reports_cumulative_epsilon_with_delta_and_budget_left(ledger_path: Path) -> None:
    ledger = PrivacyLedger.open(ledger_path, FP_A)
    ledger.record(entry(1, run_id="run-1"), budget=BUDGET)
    ledger.record(entry(1, run_id="run-2"))
    ledger.record(entry(2, run_id="run-2"))

    first, second = summarize(ledger_path)

    assert (first.run_id, first.rounds, second.run_id, second.rounds) == ("run-1", 1, "run-2", 2)
    assert second.epsilon == pytest.approx(ledger.epsilon_spent(DELTA, "prv"), abs=1e-9)
    assert first.epsilon < second.epsilon
    assert second.delta == DELTA
    assert second.budget_left == pytest.approx(3.0 - second.epsilon)


def test_summary_at_another_delta_reports_no_budget_left(ledger_path: Path) -> None:
    recorded_ledger(ledger_path)
    (run,) = summarize(ledger_path, delta=1e-6)
    assert run.delta == 1e-6
    assert run.budget_left is None


def test_summary_of_edited_ledger_is_refused(ledger_path: Path) -> None:
    data = json.loads(recorded_ledger(ledger_path).read_text())
    data["datasets"][FP_A]["entries"].pop()
    ledger_path.write_text(json.dumps(data))
    with pytest.raises(LedgerError):
        summarize(ledger_path)
