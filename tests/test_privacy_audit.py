"""The one-run lower bound (common/privacy_audit.py) against answers known in advance: the
paper's algorithm in closed form, and coin flips whose epsilon we chose."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.privacy_audit import (
    AuditSettingError,
    SiteScores,
    audit_bound,
    epsilon_lower_bound,
    guess,
    p_value,
    provable,
)


def randomized_response_accuracy(epsilon: float) -> float:
    return math.exp(epsilon) / (1 + math.exp(epsilon))


def test_all_guesses_right_matches_the_closed_form_without_delta():
    # delta = 0, v = r: P[Binomial(r, q) = r] = q^r = 1 - confidence, so q = 0.05^(1/r).
    for guesses in (10, 100, 1000):
        q = 0.05 ** (1 / guesses)
        expected = math.log(q / (1 - q))
        bound = epsilon_lower_bound(guesses, guesses, guesses, 0.0, 0.95)
        assert bound == pytest.approx(expected, abs=1e-6)
    # r = 100 perfect guesses prove epsilon >= 3.49 and no more (the paper's Figure 1 regime)
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.95) == pytest.approx(3.4926, abs=1e-3)


def test_the_delta_term_follows_the_papers_theorem():
    # P[W >= v] <= P[Bin(r,q) >= v] + 2 m delta max_i P[v-i <= Bin < v] / i, by hand for r = 3.
    m, r, v, epsilon, delta = 10, 3, 2, 1.0, 0.01
    q = randomized_response_accuracy(epsilon)
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = pmf[2] + pmf[3]
    alpha = max(pmf[1] / 1, (pmf[1] + pmf[0]) / 2)
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(tail + 2 * m * delta * alpha)


def test_a_delta_lowers_the_bound():
    without = epsilon_lower_bound(1000, 500, 490, 0.0, 0.95)
    with_delta = epsilon_lower_bound(1000, 500, 490, 1e-5, 0.95)
    assert 0 < with_delta < without


def test_chance_level_guessing_proves_nothing():
    assert epsilon_lower_bound(1000, 500, 250, 1e-5, 0.95) == 0.0


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_coin_flips_of_known_epsilon_are_not_overestimated(epsilon, delta):
    """Guesses right with randomized response's accuracy: the 95% bound must stay <= epsilon
    in at least 95% of trials."""
    rng = np.random.default_rng(int(epsilon * 10) + int(delta > 0))
    trials, canaries, guesses = 400, 1000, 500
    correct = rng.binomial(guesses, randomized_response_accuracy(epsilon), trials)
    bound_of = {
        v: epsilon_lower_bound(canaries, guesses, int(v), delta, 0.95) for v in set(correct)
    }
    assert np.mean([bound_of[v] <= epsilon for v in correct]) >= 0.95


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_many_coin_flips_bring_the_bound_close_to_epsilon(epsilon):
    guesses = 200_000
    correct = round(guesses * randomized_response_accuracy(epsilon))
    bound = epsilon_lower_bound(guesses, guesses, correct, 0.0, 0.95)
    assert epsilon - 0.05 < bound <= epsilon


def test_guesses_are_the_most_confident_half_in_half_out():
    scores = np.array([0.1, 5.0, -3.0, 0.2, 4.0, -2.0])
    assert guess(scores, 4).tolist() == [0, 1, -1, 0, 1, -1]
    assert guess(scores, 0).tolist() == [0] * 6


def test_perfectly_separated_scores_give_a_large_bound_and_random_ones_none():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    separated = SiteScores("a", np.where(included, 1.0, 0.0) + rng.normal(0, 0.01, 1000), included)
    random = SiteScores("a", rng.normal(size=1000), included)
    assert audit_bound([separated], 1e-5, 0.95).epsilon_lower_bound > 4
    assert audit_bound([random], 1e-5, 0.95).epsilon_lower_bound < 0.5


def test_sites_rank_their_own_scores():
    """Two sites on scales a thousand times apart: each is guessed on its own ranking."""
    rng = np.random.default_rng(1)
    sites = []
    for scale in (1.0, 1000.0):
        included = rng.random(500) < 0.5
        scores = scale * (np.where(included, 1.0, 0.0) + rng.normal(0, 0.01, 500))
        sites.append(SiteScores(str(scale), scores, included))
    bound = audit_bound(sites, 1e-5, 0.95)
    assert bound.correct == bound.guesses and bound.canaries == 1000


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_a_confidence_outside_zero_one_is_refused(confidence):
    with pytest.raises(AuditSettingError, match="confidence"):
        epsilon_lower_bound(10, 10, 10, 0.0, confidence)


def test_settings_that_leave_nothing_to_prove_are_recognised():
    assert provable(4000, 1e-5, 0.95) > 3  # the default white-box audit: room for a large bound
    assert provable(120, 1e-5, 0.95) > 0  # heart's black-box default: 30 canaries a site
    assert provable(4000, 1e-2, 0.95) == 0.0  # 2 m delta = 80: no guesses can prove anything
    assert provable(4, 0.0, 0.95) == 0.0  # 2 guesses, all right, happen by chance 1 time in 4
