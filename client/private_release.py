"""The Gaussian mechanisms through which a DP site releases numbers other than its model update.

Each is one accountant entry (sample rate 1, one step, the noise multiplier relative to what one
record can change), charged to the site's ledger before the number leaves: the record count,
released once per data set and repeated afterwards at no cost, and each evaluation reply.
Noise comes from the OS's entropy (`random.SystemRandom`), never from the run's seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from common.evaluation import evaluate
from common.site_data import EncodedDataset

MAX_RECORD_LOSS = 5.0
"""Each record's evaluation loss is clipped here (ln 77 = 4.3: chance on the widest task)."""
EVALUATION_BATCH_SIZE = 256
_entropy = random.SystemRandom()


def noisy_count(count: int, noise_std: float) -> int:
    """One record changes the count by one, so the noise multiplier is the standard deviation.
    At least 1: it weights the site's update in FedAvg."""
    return max(1, round(count + _entropy.gauss(0.0, noise_std)))


@dataclass(frozen=True)
class NoisyEvaluation:
    loss: float
    accuracy: float
    num_examples: int


def evaluate_privately(
    model: nn.Module, test_set: EncodedDataset, noise_multiplier: float, device: torch.device
) -> NoisyEvaluation:
    """Loss sum (each record's loss clipped and scaled into [0, 1]), correct count and record
    count, released as one vector: one record moves it by at most sqrt(3), so each coordinate
    gets Gaussian noise of noise_multiplier * sqrt(3). Means are post-processing of the noisy
    sums, clamped to their ranges."""
    exact = evaluate(model, test_set, EVALUATION_BATCH_SIZE, device, MAX_RECORD_LOSS)
    std = noise_multiplier * math.sqrt(3)
    count = exact.num_examples + _entropy.gauss(0.0, std)
    correct = exact.accuracy * exact.num_examples + _entropy.gauss(0.0, std)
    loss = exact.loss * exact.num_examples / MAX_RECORD_LOSS + _entropy.gauss(0.0, std)
    released = max(count, 1.0)
    return NoisyEvaluation(
        loss=min(max(loss, 0.0) * MAX_RECORD_LOSS / released, MAX_RECORD_LOSS),
        accuracy=min(max(correct, 0.0) / released, 1.0),
        num_examples=max(1, round(count)),
    )
