"""Evaluation of a model on encoded records, shared by clients (local test sets) and the
coordinator (a central test set)."""

from __future__ import annotations

import itertools
import time
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
    for *inputs, labels in make_loader(dataset, batch_size, shuffle=False):
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
