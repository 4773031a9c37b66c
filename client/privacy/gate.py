"""The release gate: the one place where a number computed from the site's records gets its noise.

Every release (a DP-SGD step's clipped sum, the evaluation sums, the record count) passes through
`ReleaseGate.gaussian` with the sensitivity its mechanism declares. Before that, each record's
contribution is sanitised by `clipped_sum` or `bounded_rows`: a record whose value is not finite
contributes zero, and every other is clipped to the sensitivity, so no single record can make a
release non-finite or larger than the mechanism allows. After the noise the released value is
checked to be finite; a value that is not is never sent (`NonFiniteRelease`).

Where the randomness comes from, the noise and the secret that seeds Poisson sampling, is the
gate's `noise` (`EntropyNoise`: torch's Gaussian and secrets seeded from the OS, never from the
run's seed, which the coordinator knows). Tests couple two worlds through it: the
neighbouring-world harness (tests/neighbouring_worlds.py) records what the gate released on a
data set D, replays exactly that on a neighbour D', and checks that the exact values the two
worlds fed the gate differ by at most the declared sensitivity.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol

import torch


class NonFiniteRelease(RuntimeError):
    """A release that came out non-finite after sanitising: it is not sent."""


class NoiseSource(Protocol):
    def release(
        self, mechanism: str, exact: torch.Tensor, std: float, sensitivity: float
    ) -> torch.Tensor:
        """`exact` plus Gaussian noise of standard deviation `std`."""
        ...

    def secret(self) -> int:
        """A fresh secret: the seed of a round's Poisson sampling."""
        ...


class EntropyNoise:
    """torch's Gaussian, from a generator per device seeded by the OS's entropy. (Not a CSPRNG:
    torchcsprng has no build for current torch; docs/privacy.md says what that means.)"""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def release(
        self, mechanism: str, exact: torch.Tensor, std: float, sensitivity: float
    ) -> torch.Tensor:
        device = exact.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(
                secrets.randbits(63)
            )
        noise = torch.normal(
            0.0, std, exact.shape, generator=self._generators[device], device=device
        )
        return exact + noise.to(exact.dtype)

    def secret(self) -> int:
        return secrets.randbits(63)


def default_noise() -> NoiseSource:
    """A fresh entropy-seeded source per gate (tests replace this function to couple worlds)."""
    return EntropyNoise()


class ReleaseGate:
    """One site message's releases; see the module docstring."""

    def __init__(self, noise: NoiseSource | None = None) -> None:
        self.noise = noise if noise is not None else default_noise()

    def secret(self) -> int:
        return self.noise.secret()

    def gaussian(
        self, mechanism: str, exact: torch.Tensor, sensitivity: float, noise_multiplier: float
    ) -> torch.Tensor:
        """The Gaussian mechanism on `exact`, whose records were sanitised to `sensitivity`."""
        released = self.noise.release(mechanism, exact, noise_multiplier * sensitivity, sensitivity)
        if not bool(torch.isfinite(released).all()):
            raise NonFiniteRelease(f"the {mechanism} release came out non-finite; not sent")
        return released


def clipped_sum(per_record: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Sum over records of each record's values clipped to L2 norm `max_norm`; a record whose
    values are not finite (or whose norm overflows) contributes zero. The finiteness test is on
    the norms, one per record, so a batch of finite records pays for no extra pass over them.

    A record's values are its rows of `per_record`'s blocks, [records, ...] each: one block per
    parameter, together the columns of one [records, values] matrix, and one sum per block comes
    back, shaped like a row of it. The blocks are never copied into one matrix: that copy was a
    write and a read of every per-sample gradient (BENCHMARKS.md, DP-SGD step)."""
    records = len(per_record[0])
    if records == 0:
        return [block.new_zeros(block.shape[1:]) for block in per_record]
    rows = [block.reshape(records, -1) for block in per_record]
    block_norms = torch.stack([torch.linalg.vector_norm(row, dim=1) for row in rows])
    norms = torch.linalg.vector_norm(block_norms, dim=0)
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        rows = [torch.where(finite[:, None], row, 0.0) for row in rows]
        norms = torch.where(finite, norms, 0.0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [
        torch.mv(row.t(), factor).view(block.shape[1:])
        for row, block in zip(rows, per_record, strict=True)
    ]


def bounded_rows(per_record: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each record's values clamped into [low, high]; a record with a non-finite value becomes
    a row of zeros (it contributes nothing, not even to a count)."""
    finite = torch.isfinite(per_record).all(dim=1, keepdim=True)
    return torch.where(finite, per_record.clamp(low, high), 0.0)
