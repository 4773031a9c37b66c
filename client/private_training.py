"""One round of DP-SGD on a site: plan the run's releases, charge the ledger, train under Opacus.

The plan covers everything the run will release from the records (the noisy count once per data
set, the DP-SGD rounds, the noisy evaluation replies), so the noise is calibrated for all of it
and the site's ledger, not the run config, enforces the budget. Order matters. The round is
charged to the on-disk ledger *before* training, so a crash after
training but before the update leaves can only over-count privacy, never under-count it. A fresh
model and PrivacyEngine each round: wrapping a module twice would add Opacus' hooks twice.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F

from client.dp_optimizer import FlatPrivacyEngine
from client.private_release import noisy_count
from client.training import make_optimizer, stop_if_expired, train_epochs
from common.evaluation import LocalResult, make_loader
from common.models import TextTransformer
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
from common.site_data import EncodedDataset
from common.site_policy import PolicyRefusal, SitePolicy


@dataclass(frozen=True)
class SitePrivacy:
    """A DP site's standing: its policy, the lifetime budget its ledger enforces, the ledger,
    and where its records are (shown in the ledger so a person can tell data sets apart)."""

    policy: SitePolicy
    budget: PrivacyBudget
    ledger: PrivacyLedger
    source: str


@dataclass(frozen=True)
class RunPlan:
    """The noise of every release a run will make, fixed at its first message."""

    train_sigma: float
    evaluation_sigma: float | None  # None: the site's policy releases no evaluation
    evaluations: int  # evaluation replies the run may have
    sample_rate: float
    steps: int


def planned_evaluations(rounds: int) -> int:
    """Round 0 (the initial model), then one evaluation after each round."""
    return rounds + 1


@dataclass(frozen=True)
class PrivateRound:
    result: LocalResult
    noise_multiplier: float
    epsilon_round: float  # this round alone
    epsilon_total: float  # every release ever made from this data set, this round included
    delta: float
    num_examples: int  # what may leave the site: the noisy count, or the exact one if allowed


def site_budget(
    policy: SitePolicy, ledger: PrivacyLedger, max_grad_norm: float, records: int
) -> PrivacyBudget:
    """The budget the ledger enforces: the site's, never the run's. An automatic delta is fixed
    at the data set's first charge, so appending records does not move the goalposts."""
    stored = ledger.stored_budget()
    delta = policy.delta
    if delta is None:
        delta = stored.target_delta if stored is not None else policy.delta_for(records)
    checked = replace(policy, delta=delta)
    checked.check_delta(records)
    return PrivacyBudget(
        target_epsilon=policy.max_epsilon,
        target_delta=delta,
        max_grad_norm=max_grad_norm,
        accountant=policy.accountant,
        neighbours=policy.neighbours,
    )


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


def plan_run(config: RunConfig, site: SitePrivacy, run_id: str, train_records: int) -> RunPlan:
    """Every release of the run (count, DP-SGD rounds, evaluation replies) planned together, so
    the run ends within the run's target-epsilon, itself at most the site's max-epsilon."""
    site.budget.validate(train_records)
    if config.batch_size > train_records:
        raise PrivacyConfigError(
            f"batch-size {config.batch_size} is larger than this client's {train_records} "
            "training records: every step would use every record, so sampling could not hide "
            f"any of them; set batch-size to at most {train_records}"
        )
    sample_rate = 1 / math.ceil(train_records / config.batch_size)  # Opacus: 1 / len(loader)
    steps = math.ceil(train_records / config.batch_size) * config.local_epochs
    entries = site.ledger.entries()
    earlier = tuple(e.history_entry for e in entries if e.run_id != run_id)
    count_planned = site.policy.example_count == "private" and not any(
        e.purpose == "count" and e.run_id != run_id for e in entries
    )
    count_release = ((site.policy.count_noise, 1.0, 1),) if count_planned else ()
    run_budget = replace(
        site.budget, target_epsilon=min(config.target_epsilon, site.budget.target_epsilon)
    )
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
        budget = site.budget
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
    return RunPlan(train_sigma, evaluation_sigma, evaluations, sample_rate, steps)


def release_count(site: SitePrivacy, run_id: str, server_round: int, records: int) -> int:
    """The number of records the site may disclose: noised and charged once per data set, then
    repeated from the ledger; exact only where the policy allows it (replace-one accounting)."""
    if site.policy.example_count == "exact":
        return records
    released = site.ledger.released_count()
    if released is not None:
        return released
    value = noisy_count(records, site.policy.count_noise)
    entry = LedgerEntry(run_id, server_round, site.policy.count_noise, 1.0, 1, purpose="count")
    site.ledger.charge(site.budget, entry, site.source, released_count=value)
    return value


def opacus_mode(config: RunConfig) -> str:
    """`auto` is torch's expanded weights (`ew`) for both models, the fastest measured with
    Confide's flat optimizer (bench/privacy.py, BENCHMARKS.md, batch 64 on a CPU): tabular 1.31x
    a non-private step against hooks 1.66x and ghost 3.12x; text, token table frozen, 1.63x
    against hooks 2.18x and ghost 2.78x. `ew` cannot run an empty Poisson batch;
    `noise_only_step` takes that step without a forward pass."""
    return "ew" if config.dp_mode == "auto" else config.dp_mode


def _unpredictable_generator(device: torch.device) -> torch.Generator:
    """torch's default generator starts from a fixed seed, so a fresh process draws the same
    "noise" every time; this one is seeded from the OS. (Not a CSPRNG: see docs/privacy.md.)"""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def freeze_token_table(model: nn.Module, config: RunConfig) -> None:
    """Under DP the text model's hashed-word table (8192 x width, ~90% of its parameters) stays
    as the coordinator sent it: a step touches a few dozen of its rows yet would noise all of
    them, and its per-sample gradients are a full copy of the table per example. A random, fixed
    table still tells words apart; the blocks above it learn."""
    if isinstance(model, TextTransformer) and config.dp_token_embedding == "frozen":
        model.token.weight.requires_grad_(False)


def noise_only_step(model: nn.Module, optimizer: DPOptimizer) -> None:
    """An empty Poisson batch still takes its step, of noise alone: skipping it would make the
    released model depend on whether any record was drawn, which DP-SGD's accounting excludes."""
    optimizer.zero_grad()
    ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)  # ghost: the clipped sum, here nothing
            if not ghost:  # the other modes clip per-sample gradients: here none
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
    optimizer.step()


def train_privately(
    model: nn.Module,
    train_set: EncodedDataset,
    config: RunConfig,
    site: SitePrivacy,
    run_id: str,
    server_round: int,
    device: torch.device,
    deadline: float | None = None,
) -> PrivateRound:
    """Raises BudgetExhausted (from the ledger) when this round would overspend, and RoundExpired
    past `deadline`: before the charge, nothing is spent; after it, the charge stands (noised
    steps were taken), though nothing leaves the site."""
    budget = site.budget
    # Poisson sampling and the noise draw from the OS's entropy, never from the run's seed: the
    # coordinator knows that seed, and with it could replay which records each step sampled
    # (voiding the amplification the accountant counts on) and subtract the noise.
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=secrets.randbits(63))
    plan = plan_run(config, site, run_id, len(train_set))
    sigma, sample_rate, steps = plan.train_sigma, plan.sample_rate, plan.steps
    assert sample_rate == 1 / len(loader)  # what Opacus' Poisson sampler uses
    stop_if_expired(deadline)  # calibration takes time: a round already over costs nothing
    num_examples = release_count(site, run_id, server_round, len(train_set))
    entry = LedgerEntry(run_id, server_round, sigma, sample_rate, steps, purpose="train")
    epsilon_total = site.ledger.charge(budget, entry, site.source)

    freeze_token_table(model, config)
    optimizer = make_optimizer(
        config.dp_optimizer, model, config.dp_learning_rate, config.weight_decay
    )
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: torchcsprng has no build for current torch
        # (docs/privacy.md says what that means). Torch warns that the first layer's inputs
        # need no gradient, which is true of every model here.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        engine = FlatPrivacyEngine(accountant=budget.accountant)
        mode = opacus_mode(config)
        ghost = mode == "ghost"
        wrapped = engine.make_private(
            module=model.to(device),
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=budget.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_unpredictable_generator(device),
            grad_sample_mode=mode,
            **({"criterion": nn.CrossEntropyLoss()} if ghost else {}),
        )
        # Ghost clipping also wraps the loss: its backward runs the two passes that clip.
        private_model, private_optimizer, loss_function, private_loader = (
            wrapped if ghost else (wrapped[0], wrapped[1], F.cross_entropy, wrapped[2])
        )
        results = []
        for _ in range(config.local_epochs):
            with BatchMemoryManager(
                data_loader=private_loader,
                max_physical_batch_size=config.physical_batch_size,
                optimizer=private_optimizer,
            ) as batches:
                results.append(
                    train_epochs(
                        private_model,
                        batches,
                        private_optimizer,
                        1,
                        device,
                        loss_function=loss_function,
                        on_empty_batch=lambda: noise_only_step(private_model, private_optimizer),
                        deadline=deadline,
                    )
                )
    seen = sum(r.num_examples for r in results)
    result = LocalResult(
        loss=sum(r.loss * r.num_examples for r in results) / max(seen, 1),
        accuracy=sum(r.accuracy * r.num_examples for r in results) / max(seen, 1),
        num_examples=len(train_set),
        seconds=sum(r.seconds for r in results),
    )
    epsilon_round = epsilon_of(
        [(sigma, sample_rate, steps)], budget.target_delta, budget.accountant, budget.neighbours
    )
    return PrivateRound(
        result, sigma, epsilon_round, epsilon_total, budget.target_delta, num_examples
    )
