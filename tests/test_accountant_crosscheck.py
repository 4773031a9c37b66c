"""Every epsilon a ledger reports, recomputed by an independent accountant: Google's
dp-accounting (privacy loss distributions), which shares no code with Opacus' PRV accountant."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from common.privacy import HistoryEntry, epsilon_of
from common.privacy_ledger import summarize

TOLERANCE = 0.02


def pld_epsilon(history: list[HistoryEntry], delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, sample_rate, steps in history:
        event = dp_accounting.GaussianDpEvent(sigma)
        if sample_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
        accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def assert_ledger_matches_pld(path: Path) -> None:
    """Each data set's epsilon in `path` (PRV) within 2% of PLD's; an RDP ledger may only be
    above it (RDP is a looser upper bound, never a lower one)."""
    content = json.loads(path.read_text(encoding="utf-8"))
    for fingerprint, dataset in content["datasets"].items():
        history = [
            (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in dataset["entries"]
        ]
        run = [s for s in summarize(path) if s.fingerprint == fingerprint][-1]
        independent = pld_epsilon(history, run.delta)
        if run.accountant == "prv":
            assert run.epsilon == pytest.approx(independent, rel=TOLERANCE), path
        else:
            assert run.epsilon >= independent * (1 - TOLERANCE), path


HISTORIES = {
    "heart eps 8, 4 rounds": [(1.5735, 0.25, 20)] * 4,
    "heart eps 1, 4 rounds": [(8.5938, 0.25, 20)] * 4,
    "bank, 10 rounds of 33 steps": [(1.1, 1 / 33, 66)] * 10,
    "two runs with different sigma": [(0.9, 0.05, 40)] * 3 + [(1.4, 0.1, 20)] * 2,
    "one full-batch release": [(2.0, 1.0, 1), (1.0, 0.02, 100)],
}


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_prv_epsilon_matches_an_independent_pld_accountant(history):
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(
        pld_epsilon(history, 1e-5), rel=TOLERANCE
    )


def test_rdp_epsilon_is_never_below_pld():
    history = HISTORIES["heart eps 8, 4 rounds"]
    assert epsilon_of(history, 1e-5, "rdp") >= pld_epsilon(history, 1e-5)
