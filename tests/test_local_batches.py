"""A client's batches without DataLoader: the same tensors, in the same order, from the same seed.

`TensorBatches` replaces `make_loader` in plain training and evaluation for speed (a simulated
client at 1,000 clients trains on one batch, and DataLoader's per-record fetching cost more than
a third of its forward pass); a seeded run must train exactly as before, epoch after epoch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.evaluation import TensorBatches, make_loader, on_device
from common.site_data import EncodedDataset


def records(count: int) -> EncodedDataset:
    rng = np.random.default_rng(count)
    return EncodedDataset(
        (
            rng.normal(size=(count, 3)).astype(np.float32),
            rng.integers(0, 9, size=(count, 2)),
        ),
        rng.integers(0, 2, size=count),
    )


@pytest.mark.parametrize("count", [1, 30, 64, 65, 200])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_make_loaders_epoch_after_epoch(count: int, shuffle: bool) -> None:
    dataset = records(count)
    fast, loader = TensorBatches(dataset, 64, shuffle, seed=7), make_loader(dataset, 64, shuffle, 7)
    assert len(fast) == len(loader)
    for _ in range(3):  # each epoch draws from the same generator, as DataLoader's does
        expected, got = list(loader), list(fast)
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert all(
                torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(mine, theirs, strict=True)
            )


def test_a_model_already_on_the_device_is_not_moved() -> None:
    model = nn.Linear(2, 2)
    moved = []
    model.to = lambda *args, **kwargs: moved.append(args)  # type: ignore[method-assign]
    assert on_device(model, torch.device("cpu")) is model
    assert not moved
    on_device(model, torch.device("meta"))
    assert moved == [(torch.device("meta"),)]
