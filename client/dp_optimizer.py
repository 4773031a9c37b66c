"""Opacus' DP-SGD step, done on one flat vector instead of one parameter at a time.

Opacus' `DPOptimizer` clips, noises and scales in Python loops over the parameters: an einsum,
a zeros-then-normal noise tensor and a scan of every parameter (`accumulated_iterations`) per
parameter. Our Transformers have ~40 small tensors, so on a CPU those loops cost ~2 ms a step,
as much as the per-sample gradients themselves (bench/privacy.py). Here the per-sample gradients
are clipped as one [batch, parameters] matrix and noised with one Gaussian draw: the same
mathematics (tests/test_dp_optimizer.py checks the step against Opacus' own to 1e-6), the same
accountant hook, at the price of one extra copy of the per-sample gradients. Ghost clipping keeps
Opacus' optimizer: it never materialises per-sample gradients, so there is nothing to flatten.
The Opacus internals this needs (the engine's optimizer hook, per-sample gradient reads, the
guard against reusing a gradient) go through common/opacus_compat.py.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer

from client.canaries import GradientCanaries, gradient_canaries
from common.opacus_compat import OptimizerHookPrivacyEngine, flat_grad_sample, use_once


class FlatDPOptimizer(DPOptimizer):
    """Per-sample clipping, Gaussian noise and mean reduction over all parameters at once."""

    canaries: GradientCanaries | None = None  # white-box audit canaries (client/canaries.py)

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = [flat_grad_sample(self, p) for p in params]
        batch = len(samples[0])
        flat = torch.cat(
            [s.reshape(batch, p.numel()) for s, p in zip(samples, params, strict=True)], dim=1
        )
        if batch == 0:  # an empty Poisson batch: nothing to clip, the noise still comes
            summed = flat.new_zeros(flat.shape[1])
        else:
            norms = torch.linalg.vector_norm(flat, dim=1)
            clip_factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            summed = clip_factor @ flat
        for p, grad in zip(params, _split_like(summed, params), strict=True):
            use_once(p.grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def add_noise(self) -> None:
        """Noise and the mean reduction together (Opacus does them in two loops)."""
        if self.secure_mode:  # needs torchcsprng, which has no build for current torch
            raise ValueError("secure_mode is not supported by Confide's DP optimizer")
        params = self.params
        records = torch.cat([p.summed_grad.reshape(-1) for p in params])
        summed = records
        if self.canaries is not None:  # once per logical step, into the clipped sum, pre-noise
            summed = summed + self.canaries.step_sum(self.max_grad_norm, summed)
        noise = torch.normal(
            0.0,
            self.noise_multiplier * self.max_grad_norm,
            summed.shape,
            generator=self.generator,
            device=summed.device,
        )
        noised = summed + noise
        if self.canaries is not None:  # the site scores its canaries on what this step released
            self.canaries.observe(noised - records, self.max_grad_norm, self.noise_multiplier)
        scale = self.expected_batch_size * self.accumulated_iterations
        flat = noised / (scale if self.loss_reduction == "mean" else 1)
        for p, grad in zip(params, _split_like(flat, params), strict=True):
            use_once(p.summed_grad)
            p.grad = grad

    def scale_grad(self) -> None:
        """Done in add_noise."""


def _split_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like each parameter, in order."""
    sizes = [p.numel() for p in params]
    return [part.view_as(p) for part, p in zip(flat.split(sizes), params, strict=True)]


class FlatPrivacyEngine(OptimizerHookPrivacyEngine):
    """Opacus' PrivacyEngine, handing out FlatDPOptimizer where it would hand out DPOptimizer."""

    _sample_rate = 0.0

    def make_private(self, **kwargs):  # type: ignore[no-untyped-def]
        """Opacus' own, remembering its Poisson rate: audit canaries are sampled at it too."""
        self._sample_rate = 1 / len(kwargs["data_loader"])
        return super().make_private(**kwargs)

    def replace_optimizer(self, optimizer: DPOptimizer) -> DPOptimizer:
        if type(optimizer) is not DPOptimizer:  # ghost clipping, distributed: Opacus' own
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
        flat.canaries = gradient_canaries(flat.params, self._sample_rate)
        return flat
