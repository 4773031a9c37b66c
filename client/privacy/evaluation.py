"""A DP site's evaluation reply: one Gaussian mechanism on three sums, through the release gate.

Each record contributes (its loss clipped and scaled into [0, 1], whether it was classified
correctly, 1 for the count); a record whose loss is not finite contributes zero to all three, so
crafted weights cannot turn one record into a NaN reply. One record moves the vector by at most
sqrt(3), so it gets noise of noise_multiplier * sqrt(3) per coordinate. The means sent are
post-processing of the noisy sums, clamped to their ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from client.privacy.gate import ReleaseGate, bounded_rows
from common.evaluation import TensorBatches, on_device
from common.site_data import EncodedDataset

MAX_RECORD_LOSS = 5.0
"""Each record's evaluation loss is clipped here (ln 77 = 4.3: chance on the widest task)."""
EVALUATION_BATCH_SIZE = 256
EVALUATION_SENSITIVITY = math.sqrt(3)
EVALUATION = "evaluation sums"


@dataclass(frozen=True)
class NoisyEvaluation:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluation_sums(
    model: nn.Module, test_set: EncodedDataset, device: torch.device
) -> torch.Tensor:
    """(scaled loss, correct, count) summed over the records, each record sanitised first."""
    on_device(model, device).eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for *inputs, labels in TensorBatches(test_set, EVALUATION_BATCH_SIZE, shuffle=False):
        logits = model(*[tensor.to(device) for tensor in inputs])
        labels = labels.to(device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        correct = (logits.argmax(dim=1) == labels) & torch.isfinite(logits).all(dim=1)
        rows = torch.stack(
            [losses / MAX_RECORD_LOSS, correct.to(losses.dtype), torch.ones_like(losses)], dim=1
        )
        total += bounded_rows(rows, 0.0, 1.0).sum(dim=0).double()
    return total


def evaluate_privately(
    model: nn.Module,
    test_set: EncodedDataset,
    noise_multiplier: float,
    device: torch.device,
    gate: ReleaseGate,
) -> NoisyEvaluation:
    exact = evaluation_sums(model, test_set, device)
    loss, correct, count = gate.gaussian(
        EVALUATION, exact, EVALUATION_SENSITIVITY, noise_multiplier
    ).tolist()
    released = max(count, 1.0)
    return NoisyEvaluation(
        loss=min(max(loss, 0.0) * MAX_RECORD_LOSS / released, MAX_RECORD_LOSS),
        accuracy=min(max(correct, 0.0) / released, 1.0),
        num_examples=max(1, round(count)),
    )
