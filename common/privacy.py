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

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

logger = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]
"""One accountant history item: ``(noise_multiplier, sample_rate, steps)``, as Opacus keeps it."""

ACCOUNTANTS = ("prv", "rdp")
MAX_NOISE_MULTIPLIER = 1e3
"""Above this sigma the model learns nothing useful; needing more means the budget is too small."""
EPSILON_TOLERANCE = 0.01
"""How far below the target the calibrated plan may end (absolute epsilon)."""


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee; the message names the fix."""


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
                f"{self.target_delta!r}; lower it, e.g. to {_suggest_delta(num_records):g}"
            )


def _suggest_delta(num_records: int) -> float:
    """A conventional delta: a power of ten at most 1/(10 n)."""
    return 10.0 ** math.floor(math.log10(1 / (10 * num_records)))


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


def _merge_consecutive(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Merge neighbours with equal (sigma, q), exactly as Opacus' ``accountant.step`` does.

    A replayed ledger then has the same shape as one long-lived accountant that took every step,
    so the two report the same epsilon, and the PRV accountant composes one distribution per
    (sigma, q) run instead of one per round (much faster for long federations).
    """
    merged: list[HistoryEntry] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


def epsilon_of(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon spent by the whole history, at ``delta``; 0.0 when nothing was spent.

    Always a fresh accountant fed the complete history: a per-round engine only ever sees one
    round and would under-report.
    """
    if not history:
        return 0.0
    acct = _make_accountant(accountant)
    acct.history = _merge_consecutive(history)
    return float(acct.get_epsilon(delta=delta))


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

    Same scheme as ``opacus.accountants.utils.get_noise_multiplier`` (double, then bisect),
    keeping the invariant eps_at(sigma_high) <= target so the answer never overshoots.
    """
    sigma_low, sigma_high = 0.0, 1.0
    eps_high = eps_at(sigma_high)
    while eps_high > target:
        sigma_low, sigma_high = sigma_high, min(2 * sigma_high, sigma_max)
        eps_high = eps_at(sigma_high)
    while target - eps_high > tolerance and sigma_high - sigma_low > 1e-6:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma)
        if eps <= target:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def calibrate_noise_multiplier(
    budget: PrivacyBudget,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    spent_history: Sequence[HistoryEntry] = (),
) -> float:
    """One noise multiplier for the whole planned federation, not one per round.

    The plan is ``planned_rounds`` rounds of ``steps_per_round`` steps at ``sample_rate``; with
    ``spent_history`` (the ledger's earlier rounds on this data set) the sigma is chosen so that
    history + plan still ends within ``budget.target_epsilon``. The result is evaluated with the
    same accountant and history shape that ``epsilon_of`` later replays, so a plan that
    calibrates also passes the ledger's per-round check.
    """
    _check_plan(sample_rate, steps_per_round, planned_rounds)
    target, delta, mechanism = budget.target_epsilon, budget.target_delta, budget.accountant
    history = list(spent_history)

    spent = epsilon_of(history, delta, mechanism)
    if spent >= target:
        raise PrivacyConfigError(
            f"privacy budget already spent: epsilon {spent:.2f} of {target:.2f} "
            f"(delta {delta:g}) on this data set; no further round can be afforded"
        )

    def eps_at(sigma: float) -> float:
        plan = [(sigma, sample_rate, steps_per_round)] * planned_rounds
        return epsilon_of(history + plan, delta, mechanism)

    if eps_at(MAX_NOISE_MULTIPLIER) > target:
        raise PrivacyConfigError(
            f"target_epsilon {target:g} (delta {delta:g}, already spent {spent:.2f}) cannot "
            f"afford {planned_rounds} round(s) of {steps_per_round} steps at sample rate "
            f"{sample_rate:.3g} even with noise multiplier {MAX_NOISE_MULTIPLIER:g}; plan fewer "
            "rounds or local steps, or agree a larger epsilon with the data holder"
        )

    if not history:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps_per_round * planned_rounds,
            accountant=mechanism,
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
        # Same merged history shape as the replay, but verify rather than trust it.
        if sigma <= MAX_NOISE_MULTIPLIER and eps_at(sigma) <= target:
            logger.info(
                "calibrated noise multiplier %.4f for %d rounds x %d steps (q=%.4g): "
                "epsilon %.3g at delta %g",
                sigma, planned_rounds, steps_per_round, sample_rate, target, delta,
            )  # fmt: skip
            return float(sigma)

    sigma = _bisect_sigma(eps_at, target, EPSILON_TOLERANCE, MAX_NOISE_MULTIPLIER)
    logger.info(
        "calibrated noise multiplier %.4f for %d more rounds x %d steps (q=%.4g) after "
        "epsilon %.3g already spent: target epsilon %.3g at delta %g",
        sigma, planned_rounds, steps_per_round, sample_rate, spent, target, delta,
    )  # fmt: skip
    return float(sigma)
