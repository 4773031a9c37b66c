"""One round of DP-SGD on a client: calibrate, charge the ledger, then train under Opacus.

Order matters. The round is charged to the on-disk ledger *before* training, so a crash after
training but before the update leaves can only over-count privacy, never under-count it. A fresh
model and PrivacyEngine each round: wrapping a module twice would add Opacus' hooks twice.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F

from client.dp_optimizer import FlatPrivacyEngine
from client.training import make_optimizer, train_epochs
from common.evaluation import LocalResult, make_loader
from common.models import TextTransformer
from common.privacy import (
    HistoryEntry,
    PrivacyBudget,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    epsilon_of,
)
from common.privacy_ledger import LedgerEntry, PrivacyLedger
from common.run_config import RunConfig
from common.site_data import EncodedDataset


@dataclass(frozen=True)
class PrivateRound:
    result: LocalResult
    noise_multiplier: float
    epsilon_round: float  # this round alone
    epsilon_total: float  # every round ever run on this data set, this one included
    delta: float


@lru_cache(maxsize=64)
def _calibrated_sigma(
    budget: PrivacyBudget,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    earlier_runs: tuple[HistoryEntry, ...],
) -> float:
    """The same sigma for every round of a run, however often the client process restarts."""
    return calibrate_noise_multiplier(
        budget, sample_rate, steps_per_round, planned_rounds, earlier_runs
    )


def noise_for_run(
    config: RunConfig,
    budget: PrivacyBudget,
    ledger: PrivacyLedger,
    run_id: str,
    sample_rate: float,
    steps: int,
) -> float:
    """A fixed sigma from the config, or one calibrated so that every earlier run on this data set
    plus all planned rounds of this one end within the budget."""
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    entries = ledger.entries()
    this_run = [e for e in entries if e.run_id == run_id]
    if this_run:  # calibrated in this run's first round: the ledger remembers it
        return this_run[0].noise_multiplier
    earlier = tuple(e.history_entry for e in entries if e.run_id != run_id)
    return _calibrated_sigma(budget, sample_rate, steps, config.num_server_rounds, earlier)


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
    budget: PrivacyBudget,
    ledger: PrivacyLedger,
    run_id: str,
    server_round: int,
    device: torch.device,
) -> PrivateRound:
    """Raises BudgetExhausted (from the ledger) when this round would overspend."""
    budget.validate(len(train_set))
    if config.batch_size > len(train_set):
        raise PrivacyConfigError(
            f"batch-size {config.batch_size} is larger than this client's {len(train_set)} "
            "training records: every step would use every record, so sampling could not hide "
            f"any of them; set batch-size to at most {len(train_set)}"
        )
    # Poisson sampling and the noise draw from the OS's entropy, never from the run's seed: the
    # coordinator knows that seed, and with it could replay which records each step sampled
    # (voiding the amplification the accountant counts on) and subtract the noise.
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=secrets.randbits(63))
    sample_rate = 1 / len(loader)  # what Opacus' Poisson sampler uses
    steps = len(loader) * config.local_epochs
    sigma = noise_for_run(config, budget, ledger, run_id, sample_rate, steps)
    epsilon_total = ledger.charge(
        budget, LedgerEntry(run_id, server_round, sigma, sample_rate, steps)
    )

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
        [(sigma, sample_rate, steps)], budget.target_delta, budget.accountant
    )
    return PrivateRound(result, sigma, epsilon_round, epsilon_total, budget.target_delta)
