"""Evaluation of a model on encoded records, shared by clients (local test sets) and the
coordinator (a central test set)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.site_data import EncodedDataset


@dataclass(frozen=True)
class LocalResult:
    loss: float
    accuracy: float
    num_examples: int
    seconds: float


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)`, skipped when every tensor is there already: `to` walks and re-assigns
    every tensor of the model each call, twice per client-round in a simulation worker."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if all(tensor.device == device for tensor in tensors):
        return model
    return model.to(device)


def make_loader(
    dataset: EncodedDataset, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    tensors = [torch.from_numpy(array) for array in (*dataset.inputs, dataset.labels)]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


class TensorBatches:
    """`make_loader`'s batches, the same tensors in the same order from the same seed, cut from
    whole tensors instead of fetched record by record and collated: for the one 30-record batch
    of a client at 1,000 clients, DataLoader's machinery cost more than a third of the forward
    pass (BENCHMARKS.md, Scale). Not for DP-SGD, whose Poisson sampling needs a DataLoader."""

    def __init__(self, dataset: EncodedDataset, batch_size: int, shuffle: bool, seed: int = 0):
        self.tensors = [torch.from_numpy(array) for array in (*dataset.inputs, dataset.labels)]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[-1]) / self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        count = len(self.tensors[-1])
        if not self.shuffle:
            for start in range(0, count, self.batch_size):
                yield [tensor[start : start + self.batch_size] for tensor in self.tensors]
            return
        # What DataLoader takes from its generator each epoch: a base seed for its workers,
        # RandomSampler's permutation, and (drawn as it runs dry) one permutation more.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(count, generator=self.generator)
        torch.randperm(count, generator=self.generator)
        for start in range(0, count, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield [tensor[rows] for tensor in self.tensors]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: EncodedDataset,
    batch_size: int,
    device: torch.device,
    max_record_loss: float | None = None,
) -> LocalResult:
    """Mean loss and accuracy; `max_record_loss` clips each record's loss, which bounds what one
    record adds to the sum (a site's noisy evaluation needs that bound)."""
    started = time.perf_counter()
    on_device(model, device).eval()
    total_loss, correct = 0.0, 0
    for *inputs, labels in TensorBatches(dataset, batch_size, shuffle=False):
        inputs = [tensor.to(device) for tensor in inputs]
        labels = labels.to(device)
        logits = model(*inputs)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if max_record_loss is not None:
            losses = losses.clamp(max=max_record_loss)
        total_loss += losses.sum().item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    count = len(dataset)
    return LocalResult(
        loss=total_loss / max(count, 1),
        accuracy=correct / max(count, 1),
        num_examples=count,
        seconds=time.perf_counter() - started,
    )
