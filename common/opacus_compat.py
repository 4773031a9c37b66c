"""Every private Opacus name Confide touches, in one place, behind the Opacus it was written for.

client/privacy/optimizer.py does Opacus' DP-SGD step on one flat vector, and Opacus 1.6 has no public
hook for that: the engine builds its optimizer in the private `PrivacyEngine._prepare_optimizer`,
per-sample gradients are read through the private `DPOptimizer._get_flat_grad_sample`, and the
guard against using a gradient twice (a step without `zero_grad` would spend privacy twice) is the
private pair `_check_processed_flag` / `_mark_as_processed`. On another Opacus series a private
engine is refused with one LibraryVersionError line when it is made, before any training, instead
of silently losing the flat step (and the audit canaries it carries) or failing mid-round.
tests/test_library_compat.py checks each name against the installed Opacus.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer  # its private names: looked up on use

from common.library_versions import require_version

OPACUS_SERIES = "1.6."


def require_opacus() -> None:
    """One LibraryVersionError line unless the installed Opacus is the series of these shims."""
    require_version("opacus", OPACUS_SERIES, "common/opacus_compat.py")


class OptimizerHookPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine with a public hook on the DP optimizer it builds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_opacus()
        super().__init__(*args, **kwargs)

    def replace_optimizer(self, optimizer: DPOptimizer) -> DPOptimizer:
        """The optimizer `make_private` hands out instead of Opacus' own; Opacus' by default."""
        return optimizer

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        return self.replace_optimizer(super()._prepare_optimizer(**kwargs))


def flat_grad_sample(optimizer: DPOptimizer, parameter: torch.Tensor) -> torch.Tensor:
    """`parameter`'s per-sample gradients as one tensor, however many batches it accumulated."""
    return optimizer._get_flat_grad_sample(parameter)


def use_once(gradients: torch.Tensor | list[torch.Tensor]) -> None:
    """Mark per-sample (or summed) gradients used by this step; ValueError if a step already
    used them, i.e. `zero_grad` was not called in between (Opacus' own guard)."""
    opacus_optimizer._check_processed_flag(gradients)
    opacus_optimizer._mark_as_processed(gradients)
