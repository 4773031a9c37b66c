"""Differential-privacy accounting and budget logic for DP-SGD clients.

The promise to a data holder is one number for the *whole life* of its data set: "at most
epsilon at delta, across every round and every federation". Two mistakes break that promise
quietly, and this module exists to avoid both:

* calibrating the noise per round (``make_private_with_epsilon`` each round) lets every round
  spend the full budget, so R rounds spend far more than promised;
* asking a fresh per-round ``PrivacyEngine`` for epsilon reports one round, not the total.

So the noise multiplier is calibrated once for the planned federation (rounds x local steps),
taking what the data set has already spent into account, and epsilon is always recomputed from
the complete ``(noise_multiplier, sample_rate, steps)`` history kept in the privacy ledger.

Opacus' sample rate with Poisson sampling is ``1 / len(data_loader)``; ``steps`` is the number
of optimizer steps actually taken in a round.

No Flower and no training loop here: pure accounting, so it can be tested and audited alone.
Opacus (and with it torch) is imported lazily, so reading and writing the ledger stays fast.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

logger = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]
"""One accountant history item: ``(noise_multiplier, sample_rate, steps)``, as Opacus keeps it."""

ACCOUNTANTS = ("prv", "rdp")
NEIGHBOUR_RELATIONS = ("add-remove", "replace-one")
MAX_NOISE_MULTIPLIER = 1e3
"""Above this sigma the model learns nothing useful; needing more means the budget is too small."""
EPSILON_TOLERANCE = 0.01
"""How far below the target the calibrated plan may end (absolute epsilon)."""
MIN_NOISE_MULTIPLIER = 0.3
"""Calibration never searches below this sigma: no useful budget needs it. It does not bound the
accountant's cost by itself (sigma 0.3 over 960 steps at q = 1/8 takes 2.3 GiB): that is
MAX_PRV_GRID_POINTS' work, for every history, calibrated or fixed."""
MAX_PRV_GRID_POINTS = 30_000_000
"""The most the PRV accountant is asked to hold: its grid's points x (distinct mechanisms + 6).

Opacus discretises each distinct mechanism on one grid, which grows as sigma falls (steeply) and
with sqrt(steps); memory went as at most 27 bytes and time 2 us per point of that product, so an
accounting stays within about 1 GB and a minute of a site's CPU, and is refused otherwise."""
# Measured with Opacus 1.6 on 2 CPU cores (wall; peak RSS above the 0.35 GiB torch takes):
#   at the bound, q = 1/8 x 240 steps (heart) from sigma 0.258: 2.0 s, 0.27 GiB; 960 steps from
#   0.491 and 2,400 from 0.774: 3.4 s, 0.67 GiB; q = 0.01 x 10,000 steps from 0.495: 2.8 s,
#   0.67 GiB; 16, 32 and 51 mechanisms (a long ledger, epsilon 7 for the last): 17-21 s,
#   0.67 GiB. Over it: heart at sigma 0.05 (issue 24), 4.8e8 points, 24 GB; at 0.15, 18 s,
#   3.0 GiB; at 0.3 over 960 steps, 11 s, 2.3 GiB; 8 mechanisms of 4.7e6 points, 73 s. A single
#   run near the bound spends epsilon 30 or more.
CALIBRATION_SECONDS = 120.0
"""Calibration stops with an error after this long rather than burn a site's CPU."""


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee; the message names the fix."""


class AccountingBoundError(PrivacyConfigError):
    """A history the PRV accountant cannot account for within MAX_PRV_GRID_POINTS.

    Its own class so calibration can count such a sigma as too small rather than fail."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class PrivacyBudget:
    """The (epsilon, delta) promise for one data set, plus the clipping bound DP-SGD needs.

    Checked on construction so an impossible budget fails at start-up, not mid-federation.
    ``validate(num_records)`` adds the one check that needs the data: delta < 1/n, because a
    delta of 1/n or more allows a mechanism that simply publishes one record.
    """

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str = "prv"
    neighbours: str = "add-remove"

    def __post_init__(self) -> None:
        eps = self.target_epsilon
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise PrivacyConfigError(
                f"target_epsilon (run config: target-epsilon) must be a finite number > 0, "
                f"got {eps!r}; set it to the promised epsilon, e.g. 3.0"
            )
        delta = self.target_delta
        if not _is_number(delta) or not math.isfinite(delta) or not 0 < delta < 1:
            raise PrivacyConfigError(
                f"target_delta (run config: target-delta) must be in (0, 1/n) for n training "
                f"records, got {delta!r}; use e.g. 1e-5, well below 1/n"
            )
        norm = self.max_grad_norm
        if not _is_number(norm) or not math.isfinite(norm) or norm <= 0:
            raise PrivacyConfigError(
                f"max_grad_norm (run config: max-grad-norm) must be a finite number > 0, "
                f"got {norm!r}; per-sample gradients are clipped to it, e.g. 1.0"
            )
        if self.accountant == "gdp":
            raise PrivacyConfigError(
                "accountant (run config: accountant) 'gdp' is refused: its CLT approximation "
                "can under-estimate epsilon and is invalid when sigma or the sample rate "
                "change between rounds; use 'prv' (tight) or 'rdp' (conservative)"
            )
        if self.neighbours not in NEIGHBOUR_RELATIONS:
            raise PrivacyConfigError(
                f"neighbours must be one of {NEIGHBOUR_RELATIONS}, got {self.neighbours!r}"
            )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant (run config: accountant) must be one of {ACCOUNTANTS}, "
                f"got {self.accountant!r}; use 'prv'"
            )

    def validate(self, num_records: int) -> None:
        """Check delta against the data set size n: the guarantee needs delta < 1/n."""
        if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
            raise PrivacyConfigError(
                f"num_records must be a positive integer, got {num_records!r}; "
                "pass the number of training records on this client"
            )
        if not self.target_delta < 1 / num_records:
            raise PrivacyConfigError(
                f"target_delta (run config: target-delta) must be in (0, 1/n) = "
                f"(0, {1 / num_records:.3g}) for n={num_records} training records, got "
                f"{self.target_delta!r}; lower it, e.g. to {suggest_delta(num_records):g}"
            )


def suggest_delta(num_records: int) -> float:
    """A conventional delta: a power of ten at most 1/(10 n)."""
    return 10.0 ** math.floor(math.log10(1 / (10 * max(num_records, 1))))


def _make_accountant(accountant: str) -> IAccountant:
    """A fresh Opacus accountant; imported lazily because opacus pulls in torch."""
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        return PRVAccountant()
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        return RDPAccountant()
    # Goes through PrivacyBudget's checks so "gdp" gets the same explanation everywhere.
    PrivacyBudget(target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0, accountant=accountant)
    raise AssertionError("unreachable")  # pragma: no cover


def _merge_equal(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """One entry per distinct subsampled mechanism, and all Gaussian mechanisms (q = 1) as one.

    Composition does not depend on order, and k Gaussian mechanisms of noise multipliers
    sigma_i compose exactly to one of noise multiplier (sum_i 1 / sigma_i**2) ** -1/2; so this
    changes no epsilon, yet the PRV accountant composes one distribution per DP-SGD setting plus
    one for every noisy count and evaluation reply together, which keeps a long ledger fast.
    """
    merged: dict[tuple[float, float], int] = {}
    gaussian_precision = 0.0  # sum of steps / sigma**2 over the q = 1 entries
    for sigma, q, steps in history:
        if q == 1.0:
            gaussian_precision += int(steps) / float(sigma) ** 2
            continue
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    entries = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    if gaussian_precision > 0:
        entries.append((gaussian_precision**-0.5, 1.0, 1))
    return entries


def epsilon_of(
    history: Sequence[HistoryEntry],
    delta: float,
    accountant: str,
    neighbours: str = "add-remove",
) -> float:
    """Epsilon spent by the whole history, at ``delta``; 0.0 when nothing was spent.

    Always a fresh accountant fed the complete history: a per-round engine only ever sees one
    round and would under-report. Opacus' accountants assume add/remove-one neighbours; under
    replace-one (a site that publishes its exact record count) one record moves a clipped sum by
    up to twice the clipping bound, so every mechanism is accounted at half its noise multiplier.
    """
    if not history:
        return 0.0
    named = history  # the settings as the caller gave them, for a refusal's message
    if neighbours == "replace-one":
        history = [(sigma / 2, q, steps) for sigma, q, steps in history]
    merged = tuple(_merge_equal(history))
    if accountant == "prv" and len(merged) == 1 and merged[0][1] == 1.0:
        return _gaussian_epsilon(1 / merged[0][0], delta)  # exact, where PRV approximates
    if accountant == "prv":  # RDP costs milliseconds at any sigma: a formula per order
        _check_prv_grid(merged, delta, named)
    return _accounted_epsilon(merged, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _accounted_epsilon(merged: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """A pure function of the history, kept: a site accounts the same histories again and again
    (the ledger's check before a charge, the round's own epsilon, each message's plan), and one
    accounting costs 5-50 ms with RDP's fractional orders and 0.1-3 s with PRV."""
    acct = _make_accountant(accountant)
    acct.load_state_dict({"history": list(merged), "mechanism": acct.mechanism()})
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q): -inf at q = 1, harmless
        return float(acct.get_epsilon(delta=delta))


def _check_prv_grid(
    merged: Sequence[HistoryEntry], delta: float, named: Sequence[HistoryEntry]
) -> None:
    """Refuse, before Opacus allocates it, a grid over MAX_PRV_GRID_POINTS.

    The grid is Opacus' own (``PRVAccountant._get_domain`` at ``get_epsilon``'s defaults,
    eps_error 0.01 and delta_error delta / 1000): a half-width from an RDP bound over a mesh that
    narrows with sqrt(total steps). Computed here as floats, so even sigma 1e-6 is refused, not
    overflowed. The message names the least noise in ``named``, the history as the caller gave
    it: usually a run's fixed noise-multiplier, since calibration keeps clear of the bound."""
    points = _prv_grid_points(tuple(map(tuple, merged)), delta)
    if points * (len(merged) + 6) <= MAX_PRV_GRID_POINTS:
        return
    sigma, q, _ = min(named)  # the least noise, the usual reason for a large grid
    setting = "noise-multiplier" if q < 1.0 else "the noise of a count or evaluation release"
    total = sum(count for _, _, count in named)
    raise AccountingBoundError(
        f"{setting} = {sigma:g} (sample rate {q:.3g}; {total} steps in all, {len(merged)} "
        f"distinct mechanism(s)) needs {points:.2g} points of the PRV accountant's grid, more "
        "than this site accounts for within its bound of about 1 GB and a minute; raise "
        "noise-multiplier, plan fewer rounds or local steps, or set noise-multiplier = 0 to "
        "calibrate"
    )


@functools.lru_cache(maxsize=4096)
def _prv_grid_points(merged: tuple[HistoryEntry, ...], delta: float) -> float:
    """Points of Opacus' PRV grid for this history (kept: an RDP bound per call, 0.1-0.2 s)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    eps_error, delta_error = 0.01, delta / 1000
    steps = [count for _, _, count in merged]
    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in merged],
        steps,
        eps_error=eps_error,
        delta_error=delta_error,
    )
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


@functools.cache
def _bounded_prv() -> str:
    """Opacus' name for a PRV accountant that refuses what ``epsilon_of`` refuses, registered so
    that Opacus' own search (``get_noise_multiplier``, from sigma 0 up) is bounded too."""
    from opacus.accountants import PRVAccountant, register_accountant

    class BoundedPRVAccountant(PRVAccountant):
        def get_epsilon(self, delta: float, **kwargs: float) -> float:
            _check_prv_grid(self.history, delta, self.history)
            return super().get_epsilon(delta, **kwargs)

    name = "confide-bounded-prv"
    register_accountant(name, BoundedPRVAccountant, force=True)  # force: survives a reload
    return name


def _check_plan(sample_rate: float, steps_per_round: int, planned_rounds: int) -> None:
    if not _is_number(sample_rate) or not math.isfinite(sample_rate) or not 0 < sample_rate <= 1:
        raise PrivacyConfigError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}; with Poisson sampling pass "
            "1 / len(data_loader)"
        )
    for name, value in (("steps_per_round", steps_per_round), ("planned_rounds", planned_rounds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PrivacyConfigError(f"{name} must be a positive integer, got {value!r}")


def _bisect_sigma(
    eps_at: Callable[[float], float], target: float, tolerance: float, sigma_max: float
) -> float:
    """Smallest-ish sigma whose plan stays <= target; every returned value was evaluated.

    Bracket as ``opacus.accountants.utils.get_noise_multiplier`` does (from 1, doubling), then
    narrow it with secant steps on log(epsilon) against log(sigma), nearly a straight line, so
    a handful of accountant calls suffice (each is ~0.5 s for a site's mixed history). Keeps
    eps_at(sigma_high) <= target, so the answer never overshoots, and never searches below
    MIN_NOISE_MULTIPLIER: a plan that fits there spends less than its target.
    """
    sigma_high = 1.0
    eps_high = eps_at(sigma_high)
    if eps_high <= target:
        sigma_low = MIN_NOISE_MULTIPLIER
        eps_low = eps_at(sigma_low)
        if eps_low <= target:
            return sigma_low
    else:
        sigma_low, eps_low = sigma_high, eps_high
        while eps_high > target:
            sigma_low, eps_low = sigma_high, eps_high
            sigma_high = min(2 * sigma_high, sigma_max)
            eps_high = eps_at(sigma_high)
    for step in range(60):
        if target - eps_high <= tolerance or sigma_high - sigma_low <= 1e-6:
            break
        sigma = math.sqrt(sigma_low * sigma_high)  # bisection in log space, every third step
        if step % 3 != 2 and math.isfinite(eps_low) and eps_high > 0:
            x_low, x_high = math.log(sigma_low), math.log(sigma_high)
            y_low, y_high = math.log(eps_low / target), math.log(eps_high / target)
            secant = math.exp(x_high - y_high * (x_high - x_low) / (y_high - y_low))
            margin = (sigma_high - sigma_low) * 0.05
            sigma = min(max(secant, sigma_low + margin), sigma_high - margin)
        eps = eps_at(sigma)
        if eps <= target:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low, eps_low = sigma, eps
    return sigma_high


def calibrate_noise_multiplier(
    budget: PrivacyBudget,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    spent_history: Sequence[HistoryEntry] = (),
    other_planned: Sequence[HistoryEntry] = (),
) -> float:
    """One noise multiplier for the whole planned federation, not one per round.

    The plan is ``planned_rounds`` rounds of ``steps_per_round`` steps at ``sample_rate``, plus
    ``other_planned`` releases (a site's noisy evaluation replies and record count); with
    ``spent_history`` (the ledger's earlier releases on this data set) the sigma is chosen so that
    history + plan still ends within ``budget.target_epsilon``. The result is evaluated with the
    same accountant and history shape that ``epsilon_of`` later replays, so a plan that
    calibrates also passes the ledger's per-round check. Bounded in time (CALIBRATION_SECONDS).
    """
    _check_plan(sample_rate, steps_per_round, planned_rounds)
    target, delta, mechanism = budget.target_epsilon, budget.target_delta, budget.accountant
    history = list(spent_history)

    def account(entries: list[HistoryEntry]) -> float:
        return epsilon_of(entries, delta, mechanism, budget.neighbours)

    spent = account(history)
    if spent >= target:
        raise PrivacyConfigError(
            f"privacy budget already spent: epsilon {spent:.2f} of {target:.2f} "
            f"(delta {delta:g}) on this data set; no further round can be afforded"
        )
    deadline = time.monotonic() + CALIBRATION_SECONDS
    fixed = history + list(other_planned)

    def eps_at(sigma: float) -> float:
        if time.monotonic() > deadline:
            raise PrivacyConfigError(
                f"calibrating the noise for target epsilon {target:g} took over "
                f"{CALIBRATION_SECONDS:g} s and was stopped; plan fewer rounds or local steps"
            )
        return account(fixed + [(sigma, sample_rate, steps_per_round)] * planned_rounds)

    def eps_or_inf(sigma: float) -> float:
        """A sigma too small to account for is, to the search, a sigma too small."""
        try:
            return eps_at(sigma)
        except AccountingBoundError:
            return math.inf

    if eps_at(MAX_NOISE_MULTIPLIER) > target:
        raise PrivacyConfigError(
            f"target_epsilon {target:g} (delta {delta:g}, already spent {spent:.2f}) cannot "
            f"afford {planned_rounds} round(s) of {steps_per_round} steps at sample rate "
            f"{sample_rate:.3g} even with noise multiplier {MAX_NOISE_MULTIPLIER:g}; plan fewer "
            "rounds or local steps, or agree a larger epsilon with the data holder"
        )

    if not fixed and budget.neighbours == "add-remove":
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps_per_round * planned_rounds,
                accountant=_bounded_prv() if mechanism == "prv" else mechanism,
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        except AccountingBoundError:
            sigma = 0.0  # its search went below what can be accounted for: bisect instead
        # Same merged history shape as the replay, but verify rather than trust it.
        if MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER and eps_at(sigma) <= target:
            logger.info(
                "calibrated noise multiplier %.4f for %d rounds x %d steps (q=%.4g): "
                "epsilon %.3g at delta %g",
                sigma, planned_rounds, steps_per_round, sample_rate, target, delta,
            )  # fmt: skip
            return float(sigma)

    sigma = _bisect_sigma(eps_or_inf, target, EPSILON_TOLERANCE, MAX_NOISE_MULTIPLIER)
    logger.info(
        "calibrated noise multiplier %.4f for %d more rounds x %d steps (q=%.4g) after "
        "epsilon %.3g already spent: target epsilon %.3g at delta %g",
        sigma, planned_rounds, steps_per_round, sample_rate, spent, target, delta,
    )  # fmt: skip
    return float(sigma)


def calibrate_gaussian_releases(budget: PrivacyBudget, releases: int, epsilon: float) -> float:
    """The noise multiplier of `releases` Gaussian mechanisms (sample rate 1, one step each) that
    together spend `epsilon` at the budget's delta: a site's noisy evaluation replies.

    They compose to one Gaussian mechanism of noise multiplier sigma / sqrt(releases), whose exact
    (epsilon, delta) curve is known in closed form (Balle and Wang 2018, Theorem 8), so this is a
    bisection on a formula, not on an accountant."""
    if releases < 1 or not epsilon > 0:
        raise PrivacyConfigError(
            f"cannot plan {releases!r} noisy evaluation replies within epsilon {epsilon!r}"
        )
    scale = 2.0 if budget.neighbours == "replace-one" else 1.0  # sensitivity in clipping units
    low, high = 1e-3, 1e6  # mu = scale * sqrt(releases) / sigma: find the largest that fits
    for _ in range(200):
        mu = math.sqrt(low * high)
        if _gaussian_delta(epsilon, mu) <= budget.target_delta:
            low = mu
        else:
            high = mu
    return scale * math.sqrt(releases) / low


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which the Gaussian mechanism with sensitivity / sigma = mu is
    (epsilon, delta)-DP: the exact curve, inverted by bisection."""
    if _gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while _gaussian_delta(high, mu) > delta:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        if _gaussian_delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
    return high


def _gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity / sigma = mu."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    epsilon = min(epsilon, 700.0)  # beyond, exp overflows and delta is 0 at any useful mu
    return phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * phi(-epsilon / mu - mu / 2)
