"""The f-DP audit (common/tradeoff_audit.py) against answers known in advance: the Gaussian
mechanism's trade-off curve in closed form, the accountant the ledgers use, exact Gaussian
guessers (sound at the true curve, refuting a curve three times too private), coin flips, and
DP-SGD replayed step by step with and without its noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.privacy_audit import SiteScores, audit_bound, guess, pooled_guesses
from common.tradeoff_audit import ClaimFamily, applies, claim, lower_bound, refutes

# One hospital's sigma, q and steps that the PRV accountant puts at epsilon 8 and at epsilon 1
HEART_AT_EIGHT = [(1.5735, 0.25, 80)]
HEART_AT_ONE = [(8.5938, 0.25, 80)]


def gaussian_floor(mu: float):
    """f(alpha) = Phi(Phi^-1(1 - alpha) - mu): mu-Gaussian DP exactly."""
    return lambda alpha: float(stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu))


def test_one_unsampled_gaussian_step_gives_the_gaussian_curve():
    sigma = 0.8  # one step, rate 1: mu = 1 / sigma
    curve = claim([[(sigma, 1.0, 1)]], 1.0, 1e-5)
    exact = gaussian_floor(1 / sigma)
    for alpha in (0.001, 0.01, 0.1, 0.3, 0.6):
        assert curve.false_negative_floor(alpha) <= exact(alpha) + 1e-3  # never claims more
        assert curve.false_negative_floor(alpha) >= exact(alpha) - 0.02  # and little less


def test_the_family_at_scale_one_is_what_the_ledgers_claim():
    family = ClaimFamily([HEART_AT_EIGHT], 1e-5)
    assert family.at(1.0).epsilon == pytest.approx(8.0, rel=0.02)
    assert family.at(2.0).epsilon < family.at(1.0).epsilon < family.at(0.5).epsilon


def gaussian_guesses(mu: float, canaries: int, guesses: int, rng: np.random.Generator):
    included = rng.random(canaries) < 0.5
    scores = mu * included + rng.standard_normal(canaries)
    made = guess(scores, guesses)
    return int(np.count_nonzero(made == np.where(included, 1, -1)))


def test_an_exact_gaussian_guesser_refutes_a_too_private_curve_but_not_the_true_one():
    rng = np.random.default_rng(0)
    canaries, guesses, mu = 1000, 100, 2.0
    corrects = [gaussian_guesses(mu, canaries, guesses, rng) for _ in range(100)]
    true, too_private = gaussian_floor(mu), gaussian_floor(mu / 3)
    assert sum(refutes(true, canaries, guesses, c, 0.05) for c in corrects) <= 10
    assert sum(refutes(too_private, canaries, guesses, c, 0.05) for c in corrects) >= 90


def test_coin_flips_refute_no_claim():
    rng = np.random.default_rng(1)
    family = ClaimFamily([HEART_AT_EIGHT], 1e-5)
    for _ in range(3):
        site = SiteScores("coin", rng.standard_normal(2000), rng.random(2000) < 0.5)
        tests = [pooled_guesses([site], fraction) for fraction in (0.05, 0.1)]
        assert lower_bound(family, 2000, tests, 0.95).epsilon_lower_bound == 0.0


def replayed_scores(steps, canaries: int, noise_cut: float, rng: np.random.Generator):
    """Ideal white-box canaries through DP-SGD: each step draws a canary at the Poisson rate and
    adds noise sigma / noise_cut; the score is the log-likelihood ratio the sites use at the
    ledger's sigma (client/canaries.py)."""
    included = rng.random(canaries) < 0.5
    scores = np.zeros(canaries)
    for sigma, rate, count in steps:
        for _ in range(count):
            drawn = included & (rng.random(canaries) < rate)
            x = drawn + sigma / noise_cut * rng.standard_normal(canaries)
            lifted = np.log(rate) + (2 * x - 1) / (2 * sigma**2)
            scores += np.logaddexp(np.log1p(-rate), lifted)
    return SiteScores("replay", scores, included)


def test_replayed_dp_sgd_stays_below_its_claim_and_a_tenfold_noise_cut_is_caught():
    rng = np.random.default_rng(2)
    claimed = ClaimFamily([HEART_AT_EIGHT], 1e-5).at(1.0).epsilon
    for _ in range(3):
        honest = replayed_scores(HEART_AT_EIGHT, 2000, 1.0, rng)
        bound = audit_bound([honest], 1e-5, 0.95, [HEART_AT_EIGHT])
        assert 0 < bound.epsilon_lower_bound <= claimed, bound
    # 2,000 canaries prove at most about 6, so the bug is sought under the claim of epsilon 1
    buggy = replayed_scores(HEART_AT_ONE, 2000, 10.0, rng)
    assert audit_bound([buggy], 1e-5, 0.95, [HEART_AT_ONE]).epsilon_lower_bound > 1.02


def test_the_curve_is_tested_only_when_every_site_trained_with_real_noise():
    assert applies([HEART_AT_EIGHT, [(0.5, 0.1, 10)]])
    assert not applies([HEART_AT_EIGHT, []])  # a site without DP-SGD: no curve to test
    assert not applies([[(0.05, 0.25, 80)]])  # almost no noise: Steinke's test
    assert not applies([])
