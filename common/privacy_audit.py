"""An empirical lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

m canaries are each included with probability 1/2; after training an auditor guesses, for the
r canaries it is most sure of, whether each was in (+) or out (-), and abstains on the rest. If
training is (epsilon, delta)-DP, the number of correct guesses W obeys the paper's main theorem:

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_i P[v - i <= Binomial(r, q) < v] / i,
    q = e^epsilon / (1 + e^epsilon)

So v correct out of r with that probability below 1 - confidence refutes (epsilon, delta)-DP;
the largest refuted epsilon is the lower bound. The delta term is what makes the bound valid
against the (epsilon, delta) that DP-SGD actually claims (pure epsilon-DP it never has).

When every audited site's ledger records DP-SGD with real noise, the same guesses are tested
against that DP-SGD's whole trade-off curve instead (common/tradeoff_audit.py), which refutes
more with the same canaries; the choice depends on the plan only, never on the scores.

Pure arithmetic (numpy, scipy, dp-accounting): no torch and no Flower, so it can be checked
alone against coin flips whose answer is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from common import tradeoff_audit
from common.tradeoff_audit import Steps

GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.4)
"""Shares of each site's canaries the auditor guesses on, half in and half out (not all of them:
the included count is Binomial(m, 1/2), so guessing half of all as in would force errors). Every
share is tried and the best kept, so each is tested at (1 - confidence) / len(GUESS_FRACTIONS):
the union bound keeps the stated confidence however the best one is picked. Replaying heart's
DP-SGD at epsilon 8 (bench/results/audit-guess-grid.md): as good as the former 5-90% at 4,000
canaries and a little better at 1,000 (bounds come from the canaries the scores are surest of,
so small shares matter most); separate counts for each side (more tests, a stricter level
each) did worse."""

TRADEOFF_GUESS_FRACTIONS = (0.05, 0.1)
"""The shares tried against the sites' DP-SGD curves: the f-DP test gains most from the surest
guesses, and fewer tests mean a milder Bonferroni correction (heart at epsilon 8, 8,000
canaries, ideal replays: 0.59 of the claim against 0.55 with the four shares above;
bench/results/audit-fdp.md)."""

STEINKE = "steinke-2023"
TRADEOFF = "f-dp-2025"
"""audit.json's `method`: a single (epsilon, delta) refuted (Steinke, Nasr, Jagielski 2023) or
the sites' DP-SGD trade-off curve (Mahloujifar, Melis, Chaudhuri 2025)."""

BISECTION_STEPS = 40


class AuditSettingError(ValueError):
    """An audit setting that cannot give a valid bound; the message names the fix."""


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of `correct` or more right guesses out of `guesses` under (epsilon, delta)-DP,
    with `canaries` canaries each included with probability 1/2 (the paper's Theorem 3.1)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[Binomial >= correct]
    if correct == 0 or delta == 0:
        return min(tail, 1.0)
    # P[correct - i <= Binomial < correct] for i = 1..correct, divided by i: its maximum.
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float, confidence: float
) -> float:
    """The largest epsilon that `correct` of `guesses` refutes at `confidence`; 0 if none."""
    check_confidence(confidence)
    threshold = 1 - confidence
    if p_value(canaries, guesses, correct, 0.0, delta) >= threshold:
        return 0.0
    low, high = 0.0, 1.0  # p_value(low) < threshold <= p_value(high)
    while p_value(canaries, guesses, correct, high, delta) < threshold:
        low, high = high, 2 * high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(canaries, guesses, correct, middle, delta) < threshold:
            low = middle
        else:
            high = middle
    return low


def provable(canaries: int, delta: float, confidence: float) -> float:
    """The best bound if every guess were right: 0 means these canaries can prove nothing,
    however good the scores (too few guesses, or a delta term 2 m delta too large)."""
    per_test = 1 - (1 - confidence) / len(GUESS_FRACTIONS)
    return max(
        epsilon_lower_bound(canaries, guesses, guesses, delta, per_test)
        for guesses in (2 * max(1, round(f * canaries / 2)) for f in GUESS_FRACTIONS)
    )


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise AuditSettingError(
            f"confidence {confidence!r} must be in (0, 1); use e.g. 0.95 (--confidence 0.95)"
        )


@dataclass(frozen=True)
class SiteScores:
    """One site's canaries: the auditor's score (higher = more likely included) and the truth."""

    site: str
    scores: np.ndarray  # float [m]
    included: np.ndarray  # bool [m]


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    guess_fraction: float
    confidence: float
    delta: float
    method: str


def guess(scores: np.ndarray, count: int) -> np.ndarray:
    """+1 for the count // 2 highest scores, -1 for the count // 2 lowest (ties broken by
    position), 0 (abstain) elsewhere: the paper's positive and negative guesses."""
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=np.int8)
    half = min(count // 2, len(scores) // 2)
    if half:
        guesses[order[-half:]] = 1
        guesses[order[:half]] = -1
    return guesses


def pooled_guesses(sites: Sequence[SiteScores], fraction: float) -> tuple[int, int]:
    """(guesses, correct) with each site guessing on `fraction` of its own canaries (scores of
    different sites are on different scales: each site ranks its own)."""
    guesses = correct = 0
    for site in sites:
        made = guess(site.scores, round(fraction * len(site.scores)))
        truth = np.where(site.included, 1, -1)
        guesses += int(np.count_nonzero(made))
        correct += int(np.count_nonzero(made == truth))
    return guesses, correct


def audit_bound(
    sites: Sequence[SiteScores],
    delta: float,
    confidence: float,
    plans: Sequence[Steps] = (),
) -> AuditBound:
    """The bound from the best guess fraction, each tested at the Bonferroni-corrected level:
    against the sites' own DP-SGD curves when `plans` (each site's ledgered steps) allow it
    (common/tradeoff_audit.py), else against a single (epsilon, delta) as in Steinke et al."""
    check_confidence(confidence)
    total = sum(len(site.scores) for site in sites)
    if tradeoff_audit.applies(plans):
        fractions = TRADEOFF_GUESS_FRACTIONS
        tests = [pooled_guesses(sites, fraction) for fraction in fractions]
        found = tradeoff_audit.lower_bound(
            tradeoff_audit.ClaimFamily(plans, delta), total, tests, confidence
        )
        chosen = max(found.test, 0)
        return AuditBound(
            found.epsilon_lower_bound,
            total,
            *tests[chosen],
            fractions[chosen],
            confidence,
            delta,
            TRADEOFF,
        )
    per_test = 1 - (1 - confidence) / len(GUESS_FRACTIONS)
    best = AuditBound(0.0, total, 0, 0, 0.0, confidence, delta, STEINKE)
    for fraction in GUESS_FRACTIONS:
        guesses, correct = pooled_guesses(sites, fraction)
        if guesses == 0:
            continue
        bound = epsilon_lower_bound(total, guesses, correct, delta, per_test)
        if bound > best.epsilon_lower_bound or best.guesses == 0:
            best = AuditBound(bound, total, guesses, correct, fraction, confidence, delta, STEINKE)
    return best
