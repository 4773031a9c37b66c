"""Specifications for common.privacy: budget checks, whole-federation calibration, composition.

Real Opacus accountants throughout; small step counts keep the PRV accountant quick.
"""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant

from common.privacy import (
    PrivacyBudget,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    epsilon_of,
)

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings(
    "ignore:Optimal order is the largest alpha:UserWarning"  # Opacus' PRV domain bound, large sigma
)
Q, STEPS = 0.02, 20  # 50 batches per epoch, 20 local steps per round


def budget(**overrides) -> PrivacyBudget:
    settings = {"target_epsilon": 3.0, "target_delta": DELTA, "max_grad_norm": 1.0}
    return PrivacyBudget(**(settings | overrides))


# ----------------------------------------------------------------------------- composition


def test_epsilon_of_empty_history_is_zero() -> None:
    assert epsilon_of([], DELTA, "prv") == 0.0


def test_naive_per_round_engine_under_reports_the_composed_epsilon() -> None:
    one_round = (1.0, Q, STEPS)
    naive = epsilon_of([one_round], DELTA, "prv")  # what a fresh engine per round reports
    composed = epsilon_of([one_round] * 3, DELTA, "prv")
    assert composed > naive * 1.3


def test_epsilon_of_matches_one_accountant_that_took_every_step() -> None:
    history = [(1.1, Q, 7), (1.1, Q, 5), (1.4, 0.05, 6)]
    accountant = PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_of(history, DELTA, "prv") == pytest.approx(
        accountant.get_epsilon(DELTA), abs=1e-6
    )


def test_rdp_accountant_is_no_tighter_than_prv() -> None:
    history = [(1.0, Q, STEPS)] * 2
    assert epsilon_of(history, DELTA, "rdp") >= epsilon_of(history, DELTA, "prv")


# ----------------------------------------------------------------------------- calibration


def test_calibration_ends_planned_rounds_at_target_epsilon() -> None:
    sigma = calibrate_noise_multiplier(budget(), Q, STEPS, planned_rounds=3)
    spent = epsilon_of([(sigma, Q, STEPS)] * 3, DELTA, "prv")
    assert 0.95 * 3.0 <= spent <= 3.0


def test_calibration_with_history_keeps_history_plus_plan_within_target() -> None:
    history = [(1.5, Q, STEPS), (1.2, Q, STEPS)]
    sigma = calibrate_noise_multiplier(budget(), Q, STEPS, planned_rounds=2, spent_history=history)
    spent = epsilon_of([*history, *[(sigma, Q, STEPS)] * 2], DELTA, "prv")
    assert 0.95 * 3.0 <= spent <= 3.0


def test_calibration_with_rdp_accountant_ends_within_target() -> None:
    sigma = calibrate_noise_multiplier(budget(accountant="rdp"), Q, STEPS, planned_rounds=4)
    spent = epsilon_of([(sigma, Q, STEPS)] * 4, DELTA, "rdp")
    assert 0.95 * 3.0 <= spent <= 3.0


def test_calibration_refuses_an_already_spent_budget() -> None:
    spent_history = [(0.6, 0.1, 200)]
    assert epsilon_of(spent_history, DELTA, "prv") > 3.0
    with pytest.raises(PrivacyConfigError, match="already spent"):
        calibrate_noise_multiplier(budget(), Q, STEPS, 1, spent_history=spent_history)


def test_calibration_refuses_when_noise_would_exceed_the_cap() -> None:
    with pytest.raises(PrivacyConfigError, match="noise multiplier 1000"):
        calibrate_noise_multiplier(budget(target_epsilon=0.005), Q, STEPS, planned_rounds=3)


@pytest.mark.parametrize(
    ("sample_rate", "steps", "rounds", "setting"),
    [
        (0.0, STEPS, 3, "sample_rate"),
        (1.5, STEPS, 3, "sample_rate"),
        (Q, 0, 3, "steps_per_round"),
        (Q, STEPS, 0, "planned_rounds"),
    ],
)
def test_calibration_refuses_an_impossible_plan(sample_rate, steps, rounds, setting) -> None:
    with pytest.raises(PrivacyConfigError, match=setting):
        calibrate_noise_multiplier(budget(), sample_rate, steps, rounds)


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "3"])
def test_bad_target_epsilon_is_refused_by_name(value) -> None:
    with pytest.raises(PrivacyConfigError, match="target_epsilon"):
        budget(target_epsilon=value)


@pytest.mark.parametrize("value", [0.0, -1e-5, 1.0, math.nan])
def test_delta_outside_zero_one_is_refused_by_name(value) -> None:
    with pytest.raises(PrivacyConfigError, match="target_delta"):
        budget(target_delta=value)


@pytest.mark.parametrize("delta", [1e-3, 5e-3])
def test_delta_of_one_over_n_or_more_is_refused_for_the_data_set(delta) -> None:
    with pytest.raises(PrivacyConfigError, match=r"target_delta.*n=1000"):
        budget(target_delta=delta).validate(1000)


def test_delta_below_one_over_n_is_accepted() -> None:
    budget(target_delta=1e-5).validate(1000)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf])
def test_bad_max_grad_norm_is_refused_by_name(value) -> None:
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        budget(max_grad_norm=value)


def test_gdp_accountant_is_refused_with_the_reason() -> None:
    with pytest.raises(PrivacyConfigError, match=r"accountant.*'gdp'.*under-estimate"):
        budget(accountant="gdp")


def test_unknown_accountant_is_refused_by_name() -> None:
    with pytest.raises(PrivacyConfigError, match="accountant"):
        budget(accountant="moments")
