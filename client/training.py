"""Local training and evaluation: plain PyTorch, no Flower, so it can be tested and timed alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from common.evaluation import LocalResult, on_device


def choose_device() -> torch.device:
    """A GPU when the site has one; the same code runs on a laptop's CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(
    name: str, model: nn.Module, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.Adam(trainable, lr=learning_rate, weight_decay=weight_decay)


class RoundExpired(Exception):
    """The round's message outlived its time to live: the coordinator stopped waiting for the
    reply (its round ended, or its run stopped), so the site stops working on it."""


def stop_if_expired(deadline: float | None) -> None:
    """`deadline` is the message's expiry on the wall clock (sent at + time to live), which
    assumes the site's clock agrees with the coordinator's (NTP), as Flower's own expiry does."""
    if deadline is not None and time.time() > deadline:
        raise RoundExpired("the round's message expired (its time to live ran out); work stopped")


def train_epochs(
    model: nn.Module,
    loader: Iterable[Sequence[Tensor]],  # a DataLoader, or common.evaluation.TensorBatches
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    loss_reduction: str = "mean",
    on_empty_batch: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> LocalResult:
    """SGD over the local data; `num_examples` counts examples processed.

    With proximal_mu > 0 the FedProx term keeps weights near the global model, which damps client
    drift on skewed data. DP-SGD passes `loss_reduction = "sum"` (its per-sample gradients must
    not depend on how many records a batch drew) and what to do with the empty batches Poisson
    sampling can draw. Past `deadline` (see `stop_if_expired`) the
    next batch raises RoundExpired instead of computing an update nobody will take."""
    started = time.perf_counter()
    on_device(model, device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for *inputs, labels in loader:
            stop_if_expired(deadline)
            if len(labels) == 0:  # only Poisson sampling (DP-SGD) draws an empty batch
                if on_empty_batch:
                    on_empty_batch()
                continue
            inputs = [tensor.to(device) for tensor in inputs]
            labels = labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(*inputs)
            loss = F.cross_entropy(logits, labels, reduction=loss_reduction)
            if anchor:
                drift = sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + proximal_mu / 2 * drift
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * (len(labels) if loss_reduction == "mean" else 1)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
    return LocalResult(
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        num_examples=seen,
        seconds=time.perf_counter() - started,
    )
