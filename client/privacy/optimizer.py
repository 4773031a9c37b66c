"""Opacus' DP-SGD step, noised as one flat vector and released through the site's gate.

Opacus' `DPOptimizer` clips, noises and scales in Python loops over the parameters: an einsum,
a zeros-then-normal noise tensor and a scan of every parameter (`accumulated_iterations`) per
parameter. Our Transformers have ~40 small tensors, so on a CPU those loops cost ~2 ms a step,
as much as the per-sample gradients themselves (bench/privacy.py). Here the gate clips the
per-sample gradients where they lie, one block per parameter (`gate.clipped_sum`: a record whose
gradient is not finite contributes zero), and noises the clipped sum, one flat vector, with one
draw: the same mathematics (tests/test_dp_optimizer.py checks the step against Opacus' own to
1e-6). The mean is taken over the *planned* batch size (client/privacy/plan.py), never over a
number computed from the records: Opacus' own `expected_batch_size` is the true record count
times the sample rate, and dividing the released sum by it would publish that count. The Opacus
internals this needs go through common/opacus_compat.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer

from client.canaries import GradientCanaries
from client.privacy.gate import ReleaseGate, clipped_sum
from common.opacus_compat import OptimizerHookPrivacyEngine, flat_grad_sample, use_once

CanarySource = Callable[[list[torch.Tensor], float], GradientCanaries]
"""White-box audit canaries for a step's parameters at a sample rate (client/canaries.py)."""

DP_SGD_STEP = "dp-sgd step"


class FlatDPOptimizer(DPOptimizer):
    """Per-sample clipping, the gate's Gaussian noise and the mean over all parameters at once."""

    gate: ReleaseGate
    canaries: GradientCanaries | None = None
    planned_batch: float | None = None  # see FlatPrivacyEngine

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = [flat_grad_sample(self, p) for p in params]
        for p, grad in zip(params, clipped_sum(samples, self.max_grad_norm), strict=True):
            use_once(p.grad_sample)  # a tensor, or a list of them (accumulated batches)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def add_noise(self) -> None:
        """Noise (the gate's) and the mean reduction together (Opacus does them in two loops)."""
        if self.secure_mode:  # needs torchcsprng, which has no build for current torch
            raise ValueError("secure_mode is not supported by Confide's DP optimizer")
        params = self.params
        records = torch.cat([p.summed_grad.reshape(-1) for p in params])
        summed = records
        if self.canaries is not None:  # once per logical step, into the clipped sum, pre-noise
            summed = summed + self.canaries.step_sum(self.max_grad_norm, summed)
        noised = self.gate.gaussian(DP_SGD_STEP, summed, self.max_grad_norm, self.noise_multiplier)
        if self.canaries is not None:  # the site scores its canaries on what this step released
            self.canaries.observe(noised - records, self.max_grad_norm, self.noise_multiplier)
        if self.planned_batch is not None:  # a site: per-record losses, averaged over the plan
            flat = noised / (self.planned_batch * self.accumulated_iterations)
        else:
            scale = self.expected_batch_size * self.accumulated_iterations
            flat = noised / (scale if self.loss_reduction == "mean" else 1)
        use_once([p.summed_grad for p in params])
        for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = grad.view_as(p)

    def scale_grad(self) -> None:
        """Done in add_noise."""


class FlatPrivacyEngine(OptimizerHookPrivacyEngine):
    """Opacus' PrivacyEngine, handing out FlatDPOptimizer where it would hand out DPOptimizer.

    `expected_batch_size` is the planned (data-independent) batch a site's step divides the noised
    sum by, whatever the loss reduction: a site trains on the sum of its records' own losses
    (client/privacy/training.py says why). None keeps Opacus' own mean, for benchmarks and tests
    that compare with it."""

    def __init__(
        self,
        *args: object,
        gate: ReleaseGate | None = None,
        expected_batch_size: float | None = None,
        canaries: CanarySource | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate if gate is not None else ReleaseGate()
        self.expected_batch_size = expected_batch_size
        self.canaries = canaries
        self._sample_rate = 0.0

    def make_private(self, **kwargs):  # type: ignore[no-untyped-def]
        """Opacus' own, remembering its sampling rate: audit canaries are sampled at it too."""
        self._sample_rate = 1 / len(kwargs["data_loader"])
        return super().make_private(**kwargs)

    def replace_optimizer(self, optimizer: DPOptimizer) -> DPOptimizer:
        if type(optimizer) is not DPOptimizer:  # distributed: Opacus' own
            return optimizer
        flat = FlatDPOptimizer(
            optimizer.original_optimizer,
            noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm,
            expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=optimizer.generator,
            secure_mode=optimizer.secure_mode,
        )
        flat.gate = self.gate
        flat.planned_batch = self.expected_batch_size
        if self.canaries is not None:
            flat.canaries = self.canaries(flat.params, self._sample_rate)
        return flat
