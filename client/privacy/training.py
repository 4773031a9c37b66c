"""One round of DP-SGD on a site: plan the run's releases, charge the ledger, train under Opacus.

Order matters. The round is charged to the on-disk ledger *before* training, so a crash after
training but before the update leaves can only over-count privacy, never under-count it. A fresh
model and PrivacyEngine each round: wrapping a module twice would add Opacus' hooks twice.

Sampling is Poisson at the plan's rate (client/privacy/plan.py: from the released count, not the
exact one), each record drawn from its own coordinate of a per-step stream that the OS seeds, so
a record's draws never depend on how many records there are (`PoissonBatches`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from client.privacy.gate import ReleaseGate
from client.privacy.optimizer import CanarySource, FlatPrivacyEngine
from client.privacy.plan import RunPlan, SitePrivacy
from client.training import make_optimizer, stop_if_expired, train_epochs
from common.evaluation import LocalResult
from common.models import TextTransformer
from common.privacy import epsilon_of
from common.privacy_ledger import LedgerEntry
from common.run_config import RunConfig
from common.site_data import EncodedDataset


@dataclass(frozen=True)
class PrivateRound:
    result: LocalResult  # exact, on the sampled records: leaves only if the policy allows it
    noise_multiplier: float
    epsilon_round: float  # this round alone
    epsilon_total: float  # every release ever made from this data set, this round included
    delta: float
    num_examples: int  # the released count


class _Records(Dataset):
    """The encoded records, fetched a whole batch at a time (`__getitems__`): an empty batch is
    tensors with zero rows, the shape Opacus' empty-batch step needs."""

    def __init__(self, records: EncodedDataset) -> None:
        self.tensors = [torch.from_numpy(a) for a in (*records.inputs, records.labels)]

    def __len__(self) -> int:
        return len(self.tensors[-1])

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[rows] for tensor in self.tensors]


class PoissonBatches(Sampler[list[int]]):
    """`steps` batches per pass; in each, every record is drawn with probability `rate`, by the
    record's own coordinate of a stream seeded from (secret, step): adding a record changes no
    other record's draws, which is what the add/remove accounting assumes."""

    def __init__(self, records: int, rate: float, steps: int, secret: int) -> None:
        self.records, self.rate, self.steps, self.secret = records, rate, steps, secret
        self._taken = 0  # steps of earlier passes (epochs) of this round

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            draws = np.random.default_rng([self.secret, self._taken]).random(self.records)
            self._taken += 1
            yield np.flatnonzero(draws < self.rate).tolist()


def dp_loader(records: EncodedDataset, plan: RunPlan, secret: int) -> DataLoader:
    batches = PoissonBatches(len(records), plan.sample_rate, plan.steps_per_epoch, secret)
    return DataLoader(_Records(records), batch_sampler=batches, collate_fn=lambda batch: batch)


def opacus_mode(config: RunConfig) -> str:
    """`auto` is torch's expanded weights (`ew`) for both models, the fastest measured with
    Confide's flat optimizer (bench/privacy.py, BENCHMARKS.md, batch 64 on a CPU). `ew` cannot
    run an empty Poisson batch; `noise_only_step` takes that step without a forward pass."""
    return "ew" if config.dp_mode == "auto" else config.dp_mode


def freeze_token_table(model: nn.Module, config: RunConfig) -> None:
    """Under DP the text model's hashed-word table (8192 x width, ~90% of its parameters) stays
    as the coordinator sent it: a step touches a few dozen of its rows yet would noise all of
    them, and its per-sample gradients are a full copy of the table per example. A random, fixed
    table still tells words apart; the blocks above it learn."""
    if isinstance(model, TextTransformer) and config.dp_token_embedding == "frozen":
        model.token.weight.requires_grad_(False)


def without_dropout(model: nn.Module) -> None:
    """Dropout draws one mask for the whole batch from torch's generator, so a record's gradient
    would depend on which other records were drawn beside it; the coupling that proves a step's
    sensitivity (tests/test_neighbouring_worlds.py) needs each record's gradient to be a function
    of that record alone. A Hugging Face encoder ships with dropout 0.1; the built-in models have
    none. (The model is built fresh each DP round, so nothing else sees the change.)"""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def noise_only_step(model: nn.Module, optimizer: DPOptimizer) -> None:
    """An empty Poisson batch still takes its step, of noise alone: skipping it would make the
    released model depend on whether any record was drawn, which DP-SGD's accounting excludes."""
    optimizer.zero_grad()
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
            parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
    optimizer.step()


def train_privately(
    model: nn.Module,
    train_set: EncodedDataset,
    config: RunConfig,
    site: SitePrivacy,
    plan: RunPlan,
    gate: ReleaseGate,
    round_id: tuple[str, int],
    device: torch.device,
    deadline: float | None = None,
    canaries: CanarySource | None = None,
) -> PrivateRound:
    """Raises BudgetExhausted (from the ledger) when this round would overspend, and RoundExpired
    past `deadline`: before the charge, nothing is spent; after it, the charge stands (noised
    steps were taken), though nothing leaves the site."""
    run_id, server_round = round_id
    budget = plan.budget
    sigma, sample_rate, steps = plan.history_entry
    stop_if_expired(deadline)  # calibration takes time: a round already over costs nothing
    entry = LedgerEntry(run_id, server_round, sigma, sample_rate, steps, purpose="train")
    epsilon_total = site.ledger.charge(budget, entry, site.source)

    freeze_token_table(model, config)
    without_dropout(model)
    optimizer = make_optimizer(
        config.dp_optimizer, model, config.dp_learning_rate, config.weight_decay
    )
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: torchcsprng has no build for current torch
        # (docs/privacy.md says what that means). Torch warns that the first layer's inputs
        # need no gradient, which is true of every model here.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        engine = FlatPrivacyEngine(
            accountant=budget.accountant,
            gate=gate,
            expected_batch_size=plan.expected_batch_size,
            canaries=canaries,
        )
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model.to(device),
            optimizer=optimizer,
            data_loader=dp_loader(train_set, plan, gate.secret()),
            noise_multiplier=sigma,
            max_grad_norm=budget.max_grad_norm,
            poisson_sampling=False,  # dp_loader samples Poisson itself
            grad_sample_mode=opacus_mode(config),
            # Per-sample gradients of each record's own loss, not of the batch mean: Opacus
            # rescales a mean's by the batch drawn, and in float32 that rescaling makes one
            # record's gradient depend on how many others were drawn (7,000-fold, measured,
            # under crafted weights). FlatDPOptimizer divides by the planned batch instead.
            loss_reduction="sum",
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
                        loss_reduction="sum",
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
        result, sigma, epsilon_round, epsilon_total, budget.target_delta, plan.released_count
    )
