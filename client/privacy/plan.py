"""A DP site's plan for a run: every release it will make from its records, and their noise.

The plan covers everything the run will release (the noisy count once per data set, the DP-SGD
rounds, the noisy evaluation replies), so the noise is calibrated for all of it and the site's
ledger, not the run config, enforces the budget. Nothing in a plan is computed from the exact
record count: the count is released first, through the gate and charged, and the sampling rate,
the number of steps, the batch the mean divides by and an automatic delta are all computed from
that released count. So a plan, and every message and refusal computed from it, is the same
function of two neighbouring data sets up to the count's noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from client.privacy.gate import ReleaseGate
from common.privacy import (
    HistoryEntry,
    PrivacyBudget,
    PrivacyConfigError,
    calibrate_gaussian_releases,
    calibrate_noise_multiplier,
    epsilon_of,
)
from common.privacy_ledger import BudgetExhausted, LedgerEntry, PrivacyLedger
from common.run_config import RunConfig
from common.site_policy import PolicyRefusal, SitePolicy

RECORD_COUNT = "record count"


@dataclass(frozen=True)
class SitePrivacy:
    """A DP site's standing: its policy, its ledger, where its records are (shown in the ledger
    so a person can tell data sets apart) and the clipping bound the run's releases use."""

    policy: SitePolicy
    ledger: PrivacyLedger
    source: str
    max_grad_norm: float

    def budget(self, released_count: int) -> PrivacyBudget:
        """The budget the ledger enforces: the site's, never the run's. An automatic delta comes
        from the released count and is fixed at the data set's first charge, so appending
        records does not move the goalposts."""
        stored = self.ledger.stored_budget()
        delta = self.policy.delta
        if delta is None:
            delta = stored.target_delta if stored else self.policy.delta_for(released_count)
        replace(self.policy, delta=delta).check_delta(released_count)
        return PrivacyBudget(
            target_epsilon=self.policy.max_epsilon,
            target_delta=delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.policy.accountant,
            neighbours=self.policy.neighbours,
        )


@dataclass(frozen=True)
class RunPlan:
    """The noise of every release a run will make, fixed at its first message, and the sampling
    that DP-SGD uses: all of it a function of the released count, never of the exact one."""

    budget: PrivacyBudget
    released_count: int  # what `num-examples` says: the noisy count (exact only if allowed)
    train_sigma: float
    evaluation_sigma: float | None  # None: the site's policy releases no evaluation
    evaluations: int  # evaluation replies the run may have
    sample_rate: float
    steps_per_epoch: int
    steps: int
    expected_batch_size: float  # what DP-SGD's mean divides by

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.train_sigma, self.sample_rate, self.steps)


def planned_evaluations(rounds: int) -> int:
    """Round 0 (the initial model), then one evaluation after each round."""
    return rounds + 1


def release_count(
    site: SitePrivacy, gate: ReleaseGate, run_id: str, server_round: int, records: int
) -> int:
    """The number of training records the site may disclose: noised through the gate and
    charged once per data set, then repeated from the ledger; exact only where the policy
    allows it (replace-one accounting, where the data set's size is public). At least 1."""
    if site.policy.example_count == "exact":
        return max(1, records)
    released = site.ledger.released_count()
    if released is not None:
        return released
    sigma = site.policy.count_noise
    noisy = gate.gaussian(RECORD_COUNT, torch.tensor([float(records)]), 1.0, sigma)
    value = max(1, round(float(noisy[0])))
    entry = LedgerEntry(run_id, server_round, sigma, 1.0, 1, purpose="count")
    try:
        site.ledger.charge(site.budget(value), entry, site.source, released_count=value)
    except (BudgetExhausted, PolicyRefusal, PrivacyConfigError):
        # The drawn count was never released: a refusal naming the delta or epsilon computed
        # from it would release it uncharged. The operator's log has the same fixed line.
        raise BudgetExhausted(
            "the site's budget cannot pay for releasing its record count, the first release "
            f"of any run (count-noise = {sigma:g}); the site's operator must raise max-epsilon "
            "or count-noise in its policy"
        ) from None
    return value


@lru_cache(maxsize=64)
def _calibrated_plan(
    run_budget: PrivacyBudget,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    earlier_runs: tuple[HistoryEntry, ...],
    count_release: tuple[HistoryEntry, ...],
    evaluation_share: float | None,
    fixed_sigma: float,
) -> tuple[float, float | None]:
    """The same noise for every release of a run, however often the site process restarts:
    a pure function of what was spent before the run and what the run plans."""
    spent = epsilon_of(
        list(earlier_runs), run_budget.target_delta, run_budget.accountant, run_budget.neighbours
    )
    if spent >= run_budget.target_epsilon:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {spent:.2f} of {run_budget.target_epsilon:.2f} "
            f"already spent (delta {run_budget.target_delta:g}); this run can afford nothing"
        )
    evaluation_sigma, evaluation_plan = None, []
    if evaluation_share is not None:
        releases = planned_evaluations(planned_rounds)
        evaluation_sigma = calibrate_gaussian_releases(
            run_budget, releases, evaluation_share * (run_budget.target_epsilon - spent)
        )
        evaluation_plan = [(evaluation_sigma, 1.0, releases)]
    if fixed_sigma > 0:
        return fixed_sigma, evaluation_sigma
    train_sigma = calibrate_noise_multiplier(
        run_budget,
        sample_rate,
        steps_per_round,
        planned_rounds,
        earlier_runs,
        [*count_release, *evaluation_plan],
    )
    return train_sigma, evaluation_sigma


def plan_run(
    config: RunConfig,
    site: SitePrivacy,
    gate: ReleaseGate,
    run_id: str,
    server_round: int,
    train_records: int,
) -> RunPlan:
    """Every release of the run (count, DP-SGD rounds, evaluation replies) planned together, so
    the run ends within the run's target-epsilon, itself at most the site's max-epsilon. The
    run's batch-size is a request: at or above the released count, every step samples every
    record (rate 1), which the accounting covers; nothing is refused for it."""
    count = release_count(site, gate, run_id, server_round, train_records)
    budget = site.budget(count)
    steps_per_epoch = math.ceil(count / config.batch_size)
    sample_rate = 1 / steps_per_epoch
    steps = steps_per_epoch * config.local_epochs
    entries = site.ledger.entries()
    earlier = tuple(e.history_entry for e in entries if e.run_id != run_id)
    count_planned = site.policy.example_count == "private" and not any(
        e.purpose == "count" and e.run_id != run_id for e in entries
    )
    count_release = ((site.policy.count_noise, 1.0, 1),) if count_planned else ()
    run_budget = replace(budget, target_epsilon=min(config.target_epsilon, budget.target_epsilon))
    evaluation_share = site.policy.evaluation_share if site.policy.evaluation == "private" else None
    train_sigma, evaluation_sigma = _calibrated_plan(
        run_budget,
        sample_rate,
        steps,
        config.num_server_rounds,
        earlier,
        count_release,
        evaluation_share,
        config.noise_multiplier,
    )
    for entry in entries:  # a run keeps the noise it started with (the ledger remembers it)
        if entry.run_id == run_id and entry.purpose == "train":
            train_sigma = entry.noise_multiplier
        if entry.run_id == run_id and entry.purpose == "evaluate":
            evaluation_sigma = entry.noise_multiplier
    evaluations = planned_evaluations(config.num_server_rounds)
    if config.noise_multiplier > 0:  # a fixed sigma: the whole plan must fit the site's budget
        planned = [
            *earlier,
            *count_release,
            *([(evaluation_sigma, 1.0, evaluations)] if evaluation_sigma else []),
            *[(train_sigma, sample_rate, steps)] * config.num_server_rounds,
        ]
        planned_epsilon = epsilon_of(
            planned, budget.target_delta, budget.accountant, budget.neighbours
        )
        if planned_epsilon > budget.target_epsilon:
            raise PolicyRefusal(
                f"refused by site policy ({site.policy.source}): max-epsilon = "
                f"{site.policy.max_epsilon:g}, but the run's noise-multiplier = "
                f"{config.noise_multiplier:g} would spend epsilon {planned_epsilon:.2f} over its "
                f"{config.num_server_rounds} rounds"
            )
    return RunPlan(
        budget=budget,
        released_count=count,
        train_sigma=train_sigma,
        evaluation_sigma=evaluation_sigma,
        evaluations=evaluations,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        expected_batch_size=count * sample_rate,
    )
