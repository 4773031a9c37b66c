"""Confide's flat DP optimizer takes exactly Opacus' DP-SGD step: same clipping, same accounting,
Gaussian noise of the same scale. Real Opacus on both Transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.optimizer import FlatDPOptimizer, FlatPrivacyEngine
from tests.test_models import tabular_batch, tabular_model, text_batch, text_model

MAX_GRAD_NORM = 0.05  # small enough that every example is clipped


def dp_steps(
    engine: PrivacyEngine,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    mode: str,
    sigma: float,
    steps: int = 2,
    physical_batch: int | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`steps` DP-SGD steps over fixed batches (no Poisson sampling, so both engines see the same
    examples), each optionally split into physical batches by Opacus' BatchMemoryManager."""
    labels = torch.arange(len(inputs[0])) % 2
    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=len(labels))
    private_model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    for _ in range(steps):
        with BatchMemoryManager(
            data_loader=private_loader,
            max_physical_batch_size=physical_batch or len(labels),
            optimizer=optimizer,
        ) as batches:
            for *batch_inputs, batch_labels in batches:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(private_model(*batch_inputs), batch_labels).backward()
                optimizer.step()
    return private_model, optimizer


CASES = [
    pytest.param(tabular_model, tabular_batch, "hooks", id="tabular-hooks"),
    pytest.param(tabular_model, tabular_batch, "ew", id="tabular-ew"),
    pytest.param(text_model, text_batch, "ew", id="text-ew"),
]


@pytest.mark.parametrize(("make_model", "make_batch", "mode"), CASES)
@pytest.mark.parametrize("physical_batch", [None, 3], ids=["one-pass", "split"])
def test_flat_steps_land_where_opacus_steps_land(make_model, make_batch, mode, physical_batch):
    torch.manual_seed(0)
    model, inputs = make_model(), make_batch()
    start = [p.detach().clone() for p in model.parameters()]
    opacus_model, opacus_optimizer = dp_steps(
        PrivacyEngine(), copy.deepcopy(model), inputs, mode, 0.0, physical_batch=physical_batch
    )
    flat_model, flat_optimizer = dp_steps(
        FlatPrivacyEngine(), model, inputs, mode, 0.0, physical_batch=physical_batch
    )
    assert type(flat_optimizer) is FlatDPOptimizer
    assert type(opacus_optimizer) is not FlatDPOptimizer
    moved = [not torch.equal(p, s) for p, s in zip(flat_model.parameters(), start, strict=True)]
    assert sum(moved) > len(moved) // 2  # a real step, not a no-op on both sides
    for ours, theirs in zip(flat_model.parameters(), opacus_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_noise_has_opacus_scale_and_the_accountant_sees_every_step():
    torch.manual_seed(0)
    model, inputs = tabular_model(), tabular_batch()
    sigma, batch = 2.0, len(inputs[0])
    engine = FlatPrivacyEngine(accountant="rdp")
    clean, _ = dp_steps(PrivacyEngine(), copy.deepcopy(model), inputs, "hooks", 0.0, steps=1)
    noisy, _ = dp_steps(engine, model, inputs, "hooks", sigma, steps=1)
    # SGD with lr 1: the parameters moved by the gradient, whose noise is N(0, sigma*C) / batch.
    noise = torch.cat(
        [(c - n).reshape(-1) for c, n in zip(clean.parameters(), noisy.parameters(), strict=True)]
    ) * (batch / (sigma * MAX_GRAD_NORM))
    assert noise.numel() > 4_000
    assert abs(noise.mean().item()) < 0.05
    assert 0.95 < noise.std().item() < 1.05
    reference = PrivacyEngine(accountant="rdp")
    dp_steps(reference, tabular_model(), inputs, "hooks", sigma, steps=1)
    assert engine.accountant.history == reference.accountant.history
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5))


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_an_example_whose_gradient_is_not_finite_contributes_nothing(mode):
    torch.manual_seed(0)
    model, (numeric, categorical) = tabular_model(), tabular_batch()
    numeric = numeric.clone()
    numeric[-1, 0] = float("nan")  # the last example's gradient is NaN, every other one finite
    batch = len(numeric)
    without_it, _ = dp_steps(
        FlatPrivacyEngine(expected_batch_size=batch),
        copy.deepcopy(model),
        (numeric[:-1], categorical[:-1]),
        mode,
        0.0,
    )
    with_it, _ = dp_steps(
        FlatPrivacyEngine(expected_batch_size=batch), model, (numeric, categorical), mode, 0.0
    )
    for ours, reference in zip(with_it.parameters(), without_it.parameters(), strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
