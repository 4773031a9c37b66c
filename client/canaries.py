"""Audit canaries: inserted by a simulated site's own training code, scored at the site.

`confide audit` asks every simulated site (run config `audit-canaries` > 0) to plant m canaries
in its own training, each included with probability 1/2 from a secret the site keeps in its audit
file (`RUN/audit/SITE.json`); no canary, bit or score ever travels in a Flower message. Two kinds:

* `white-box-gradient` (DP-SGD only): canary i is a gradient of norm max-grad-norm along a fixed
  random unit direction u_i. An included canary enters DP-SGD's clipped sum in a step with the
  Poisson rate q of a record, before the noise: the accountant's epsilon counts amplification
  by sampling, so a canary present in every step would be a record the claim does not cover
  and a correct implementation would fail its audit. The site scores every step: DP-SGD's
  noised sum less the clipped sum of its own records (every step's noised sum is what the
  accountant treats as public, and DP lets an adversary know all records but the one tested),
  projected on u_i, is x = b + N(0, sigma^2) in units of max-grad-norm, with b = 1 if canary i
  was drawn; the score is the log-likelihood ratio of "included" (b ~ Bernoulli(q)) against
  "excluded" (b = 0), summed over steps. That is the most powerful test of each canary
  (Neyman-Pearson), so the audit's guesses are as sure as DP-SGD lets them be.
* `black-box-input` (any run): records with random features and random labels added to the
  site's training data; scored afterwards by the released model's confidence in their labels.

Only nodes with a `partition-id` (Flower's simulation engine) plant canaries: a real site never
trains on audit records, whatever the run config says.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.atomic_file import write_json_atomically
from common.partition import ClientSplit
from common.run_config import RunConfig
from common.site_data import EncodedDataset

WHITE_BOX = "white-box-gradient"
BLACK_BOX = "black-box-input"
PARTITION_ID_KEY = "partition-id"  # as client.local_data: only simulated nodes carry it
INPUT_CANARY_SCALE = 3.0  # numeric features of an input canary: N(0, 3^2), far from real records


@dataclass(frozen=True)
class CanaryPlan:
    """A site's canaries, all derived from the secret it keeps in its audit file."""

    site: str
    kind: str
    count: int
    secret: int

    def included(self) -> np.ndarray:
        return np.random.default_rng([self.secret, 1]).random(self.count) < 0.5

    def directions(self, dimension: int) -> torch.Tensor:
        """[count, dimension] unit rows: canary i's gradient direction."""
        return _directions(self.secret, self.count, dimension)


@lru_cache(maxsize=2)
def _directions(secret: int, count: int, dimension: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(secret % 2**63)
    rows = torch.randn(count, dimension, generator=generator)
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)


def audit_file(config: RunConfig, site: str) -> Path:
    return Path(config.run_dir) / "audit" / f"{site}.json"


def read_audit_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def site_plan(
    config: RunConfig, node_config: Mapping[str, object], split: ClientSplit
) -> CanaryPlan | None:
    """This site's plan, its secret created on first use; None unless a simulated audit."""
    if config.audit_canaries == 0 or PARTITION_ID_KEY not in node_config:
        return None
    path = audit_file(config, split.name)
    if path.is_file():
        document = read_audit_file(path)
    else:  # rounds of one site never overlap, so no two processes create it at once
        document = {
            "site": split.name,
            "kind": config.audit_kind,
            "canaries": config.audit_canaries,
            "secret": secrets.randbits(63),
            "rounds": {},
        }
        write_json_atomically(path, document)
    return CanaryPlan(split.name, document["kind"], document["canaries"], document["secret"])


class GradientCanaries:
    """What FlatDPOptimizer adds to each step's clipped sum (the included canaries that this
    step's Poisson draw picked, each a gradient of norm max-grad-norm), and each canary's
    log-likelihood ratio over the steps it has seen."""

    def __init__(self, directions: torch.Tensor, included: np.ndarray, sample_rate: float) -> None:
        self.directions = directions
        self.included = torch.from_numpy(included)
        self.sample_rate = sample_rate
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.scores = torch.zeros(len(directions), dtype=torch.float64)

    def step_sum(self, max_grad_norm: float, like: torch.Tensor) -> torch.Tensor:
        drawn = torch.rand(len(self.directions), generator=self.generator) < self.sample_rate
        total = self.directions[drawn & self.included].sum(dim=0) * max_grad_norm
        return total.to(device=like.device, dtype=like.dtype)

    def observe(self, noised: torch.Tensor, max_grad_norm: float, noise_multiplier: float) -> None:
        """Add one step's log-likelihood ratios: `noised` is the step's noised sum less the
        clipped sum of the site's records, so along u_i it is b + N(0, sigma^2) (in units of
        max-grad-norm), b ~ Bernoulli(q) if canary i is included and 0 if not."""
        x = (self.directions @ noised.detach().cpu().to(torch.float32)).double() / max_grad_norm
        q = self.sample_rate
        drawn = math.log(q) + (2 * x - 1) / (2 * noise_multiplier**2)  # log q + log N(x-1)/N(x)
        missed = math.log1p(-q) if q < 1 else -math.inf  # rate 1: a site's batch above its count
        self.scores += torch.logaddexp(torch.full_like(x, missed), drawn)


@dataclass
class CanaryRound:
    """The round in progress at a site: its plan and the canaries DP-SGD was given. The
    ClientApp hands it to DP-SGD explicitly (client/privacy/training.py)."""

    plan: CanaryPlan
    canaries: list[GradientCanaries] = field(default_factory=list)

    def for_step(self, params: list[torch.Tensor], sample_rate: float) -> GradientCanaries:
        """The canaries FlatDPOptimizer adds to each step of this round."""
        dimension = sum(p.numel() for p in params)
        canaries = GradientCanaries(
            self.plan.directions(dimension), self.plan.included(), sample_rate
        )
        self.canaries.append(canaries)
        return canaries

    def scores(self) -> np.ndarray:
        return sum((c.scores.numpy() for c in self.canaries), np.zeros(self.plan.count))


class SiteAudit:
    """The hooks client/app.py calls; all of them do nothing outside a simulated audit."""

    def __init__(self, plan: CanaryPlan | None, config: RunConfig) -> None:
        self.plan = plan
        self.config = config

    @classmethod
    def for_node(
        cls, config: RunConfig, node_config: Mapping[str, object], split: ClientSplit
    ) -> SiteAudit:
        return cls(site_plan(config, node_config, split), config)

    def training_split(self, split: ClientSplit, num_classes: int) -> ClientSplit:
        """The split to train on: with the included input canaries for a black-box audit."""
        if self.plan is None or self.plan.kind != BLACK_BOX:
            return split
        canaries = input_canaries(self.plan, split.train, num_classes)
        planted = canaries.subset(np.flatnonzero(self.plan.included()))
        train = EncodedDataset(
            tuple(
                np.concatenate([a, b])
                for a, b in zip(split.train.inputs, planted.inputs, strict=True)
            ),
            np.concatenate([split.train.labels, planted.labels]),
        )
        return ClientSplit(split.name, train, split.test)

    @contextlib.contextmanager
    def round(self, server_round: int) -> Iterator[CanaryRound | None]:
        """Around one round's training: the white-box canaries to give DP-SGD (None outside a
        white-box audit), which scores them step by step; the round's scores are kept in the
        site's audit file."""
        if self.plan is None or self.plan.kind != WHITE_BOX:
            yield None
            return
        active = CanaryRound(self.plan)
        yield active
        path = audit_file(self.config, self.plan.site)
        document = read_audit_file(path)
        document["rounds"][str(server_round)] = active.scores().tolist()
        write_json_atomically(path, document)


def input_canaries(plan: CanaryPlan, train: EncodedDataset, num_classes: int) -> EncodedDataset:
    """`plan.count` records with random features and random labels, like no real record:
    numeric features far out (N(0, 3^2) on standardised columns), categories and tokens drawn
    from the values the site's own data uses, masks all on."""
    rng = np.random.default_rng([plan.secret, 2])
    inputs = []
    for array in train.inputs:
        shape = (plan.count, *array.shape[1:])
        if array.dtype == np.bool_:
            inputs.append(np.ones(shape, dtype=np.bool_))
        elif np.issubdtype(array.dtype, np.integer):
            highest = array.max(axis=0, keepdims=True) if len(array) else np.zeros(array.shape[1:])
            inputs.append((rng.random(shape) * (highest + 1)).astype(array.dtype))
        else:
            inputs.append((rng.standard_normal(shape) * INPUT_CANARY_SCALE).astype(array.dtype))
    labels = rng.integers(0, num_classes, plan.count).astype(train.labels.dtype)
    return EncodedDataset(tuple(inputs), labels)


@torch.no_grad()
def input_canary_scores(model: nn.Module, canaries: EncodedDataset) -> np.ndarray:
    """Log-odds of each canary's own (random) label under the released model: a record the
    model trained on is fitted towards its label, one it never saw is not."""
    model.eval()
    tensors = [torch.from_numpy(array) for array in canaries.inputs]
    log_probs = F.log_softmax(model(*tensors), dim=1)
    labels = torch.from_numpy(canaries.labels)
    own = log_probs.gather(1, labels[:, None]).squeeze(1)
    others = torch.logsumexp(log_probs.scatter(1, labels[:, None], float("-inf")), dim=1)
    return (own - others).numpy()
