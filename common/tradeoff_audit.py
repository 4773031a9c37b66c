"""A tighter one-run bound for DP-SGD: test the run's whole privacy curve, not one point of it
(Mahloujifar, Melis and Chaudhuri 2025, "Auditing f-Differential Privacy in One Run").

Steinke et al.'s test (common/privacy_audit.py) asks whether the guesses refute one pair
(epsilon, delta). DP-SGD promises more than that pair: for every epsilon a delta(epsilon), which
is a trade-off curve f (no test telling a canary in from out can have a false-negative rate below
f(alpha) at false-positive rate alpha). Testing against the curve refutes weaker claims with the
same guesses, so the bound gets closer to the truth (heart at epsilon 8, 8,000 ideal canaries
replayed: 0.59 of the claim instead of 0.40, bench/results/audit-fdp.md).

The claims tested form one family: every site's DP-SGD steps as its ledger records them (Poisson
rate, noise multiplier, count), with every noise multiplier scaled by s. s = 1 is what the
ledgers claim and holds if the accounting is right; a larger s is a stronger claim, easier to
refute. The bound is the epsilon, at delta, of the weakest claim the guesses still refute: the run
is demonstrably less private than DP-SGD on the ledgers' plan with s times their noise. Read it
as an epsilon within that family: refuting a curve is not the same as refuting every mechanism
with that (epsilon, delta).

Curves come from Google's dp-accounting (privacy loss distributions with pessimistic
discretization, so each curve claims no more than DP-SGD delivers). The refutation test is the
paper's recursion; jax_privacy's version needs JAX and knows only the unsampled Gaussian, so it
is written here in a few lines.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from dp_accounting.pld import privacy_loss_distribution

from common.privacy import HistoryEntry

Steps = Sequence[HistoryEntry]
"""One site's DP-SGD as its ledger records it, in the accountant's form: (noise multiplier,
Poisson rate, steps) runs."""

MIN_NOISE_MULTIPLIER = 0.5
"""Below this the curves cost seconds to tens of seconds each (the privacy loss spreads over
thousands of buckets) and say little Steinke's test does not: such plans keep his test."""

EPSILON_GRID = np.linspace(0.0, 40.0, 1601)
LIFTED_GRID = np.exp(EPSILON_GRID)
DISCRETIZATION = 1e-3  # coarser than the accountant's 1e-4: pessimistic, and ten times faster
SCALE_RANGE = (0.25, 64.0)
BISECTION_STEPS = 10  # the scale to within 0.5%


def applies(sites: Sequence[Steps]) -> bool:
    """Whether every site trained with DP-SGD noisy enough to test its curve. Decided from the
    plan alone, before any score is seen, so choosing the test costs no confidence."""
    return bool(sites) and all(
        steps and all(sigma >= MIN_NOISE_MULTIPLIER for sigma, _, _ in steps) for steps in sites
    )


def _loss_distribution(
    steps: Steps, scale: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """One site's privacy loss, runs of the same (rate, noise) composed at once: a federation
    repeats one plan every round."""
    counts: Counter[tuple[float, float]] = Counter()
    for sigma, rate, count in steps:
        counts[sigma, rate] += count
    distributions = [
        privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma * scale,
            sampling_prob=rate,
            value_discretization_interval=DISCRETIZATION,
        ).self_compose(count)
        for (sigma, rate), count in counts.items()
    ]
    return functools.reduce(lambda a, b: a.compose(b), distributions)


@dataclass(frozen=True)
class Claim:
    """The family member at one scale: its delta(epsilon) on EPSILON_GRID, pooled over sites
    (each canary belongs to one site, so the largest delta is the federation's), and its
    epsilon at the audit's delta (the largest of any site)."""

    deltas: np.ndarray
    epsilon: float

    def false_negative_floor(self, alpha: float) -> float:
        """f(alpha): the least false-negative rate at false-positive rate alpha that an
        (epsilon, delta(epsilon))-DP mechanism allows, for every epsilon on the grid at once."""
        one_side = 1 - self.deltas - LIFTED_GRID * alpha
        other_side = (1 - self.deltas - alpha) / LIFTED_GRID
        return float(np.clip(max(one_side.max(), other_side.max()), 0.0, 1.0))


def claim(sites: Sequence[Steps], scale: float, delta: float) -> Claim:
    distributions = [_loss_distribution(steps, scale) for steps in sites]
    deltas = np.max([d.get_delta_for_epsilon(EPSILON_GRID) for d in distributions], axis=0)
    epsilon = max(d.get_epsilon_for_delta(delta) for d in distributions)
    return Claim(np.asarray(deltas), float(epsilon))


def refutes(
    floor: Callable[[float], float], canaries: int, guesses: int, correct: int, significance: float
) -> bool:
    """Whether `correct` of `guesses` (with `canaries` canaries, each in with probability 1/2)
    happen with probability below `significance` under every mechanism whose trade-off curve
    is at least `floor`: the paper's recursion, which bounds how fast the chance of one more
    correct guess can grow."""
    ratio = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        raised = max(wrong, floor(1 - ratio))
        if raised == wrong:
            break
        ratio = min(ratio + i / (guesses - i) * (raised - wrong), 1.0)
        wrong = raised
    return ratio + wrong > guesses / canaries


@dataclass
class ClaimFamily:
    """The ledgers' plan at every noise scale, each curve computed once."""

    sites: Sequence[Steps]
    delta: float
    _claims: dict[float, Claim] = field(default_factory=dict)

    def at(self, scale: float) -> Claim:
        if scale not in self._claims:
            self._claims[scale] = claim(self.sites, scale, self.delta)
        return self._claims[scale]


@dataclass(frozen=True)
class TradeoffBound:
    epsilon_lower_bound: float
    noise_scale: float  # the refuted claim's noise, in multiples of the ledgers' (0: none)
    test: int  # which of the tests refuted it (-1: none)


def lower_bound(
    family: ClaimFamily, canaries: int, tests: Sequence[tuple[int, int]], confidence: float
) -> TradeoffBound:
    """The epsilon of the weakest claim in `family` that one of `tests` ((guesses, correct)
    pairs, each at the Bonferroni-corrected level) refutes. Refuting grows with the scale, so
    the smallest refuted scale over all tests is found by one bisection."""
    significance = (1 - confidence) / len(tests)

    def refuting_test(scale: float) -> int:
        curve = family.at(scale)
        for index, (guesses, correct) in enumerate(tests):
            if guesses and refutes(
                curve.false_negative_floor, canaries, guesses, correct, significance
            ):
                return index
        return -1

    low, high = SCALE_RANGE
    test = refuting_test(high)
    if test < 0:
        return TradeoffBound(0.0, 0.0, -1)
    at_low = refuting_test(low)
    if at_low >= 0:  # refuted even at a quarter of the noise: report that, the largest we test
        return TradeoffBound(family.at(low).epsilon, low, at_low)
    for _ in range(BISECTION_STEPS):  # refuted at high, not at low
        middle = math.sqrt(low * high)
        at_middle = refuting_test(middle)
        if at_middle < 0:
            low = middle
        else:
            high, test = middle, at_middle
    return TradeoffBound(family.at(high).epsilon, high, test)
