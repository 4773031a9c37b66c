"""LoRA adapters for the text Transformer, and which of its tensors travel.

Our own module rather than `peft`: Opacus computes exact per-sample gradients for `nn.Linear`
leaves, so an adapter made of two bias-free Linears (A: in -> r, B: r -> out, B zero so that the
model starts as its base, scaled by alpha / r) beside the frozen base Linear needs no custom grad
sampler and keeps rule 1 of common/models.py; `peft` wraps Linears in its own layer classes, which
Opacus does not know, and would be a new dependency for two matrices per layer.

With adapters, only they and the classification head train; every other tensor is frozen, so the
federation exchanges only those (`federated_state`) and each side rebuilds the base itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from common.hf_model import HFTextClassifier
from common.models import TextTransformer
from common.run_config import RunConfig, RunConfigError

HEAD = "head."
ADAPTERS = ("lora_a", "lora_b")


class LoraConfigError(RunConfigError):
    """LoRA settings the model cannot take; the message names each setting and the fix."""


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)), the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def lora_problems(model: nn.Module, config: RunConfig) -> list[str]:
    """Every reason `model` cannot take `config`'s adapters, each with its fix."""
    where = f"run config: 'lora-rank' = {config.lora_rank}"
    if not isinstance(model, (TextTransformer, HFTextClassifier)):
        return [
            f"{where}: task {config.task!r} is tabular and LoRA adapts the text Transformer; "
            "set lora-rank = 0 (text tasks only: banking77, medical-text)"
        ]
    linears = {
        name: module
        for name, module in model.blocks[0].named_modules()
        if type(module) is nn.Linear
    }
    targets = config.lora_target_names()
    valid = f"use a comma list of {', '.join(linears)}"
    if not targets:
        return [f"run config: 'lora-targets' is empty; {valid}"]
    problems = [
        f"run config: 'lora-targets' names {name!r}, not a Linear in a block; {valid}"
        for name in targets
        if name not in linears
    ]
    for name in targets:
        layer = linears.get(name)
        if layer is not None and config.lora_rank > min(layer.in_features, layer.out_features):
            smaller = min(layer.in_features, layer.out_features)
            problems.append(
                f"{where} exceeds {name}'s smaller dimension ({layer.in_features} x "
                f"{layer.out_features}); use a rank from 1 to {smaller}"
            )
    return problems


def add_lora(model: nn.Module, config: RunConfig) -> nn.Module:
    """`model` with adapters on every block's targeted Linears, all else frozen but the head."""
    problems = lora_problems(model, config)
    if problems:
        raise LoraConfigError("; ".join(problems))
    for block in model.blocks:
        for name in config.lora_target_names():
            parent_name, _, attribute = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            base = getattr(parent, attribute)
            setattr(parent, attribute, LoRALinear(base, config.lora_rank, config.lora_alpha))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_travels(name))
    _PLACES.pop(model, None)  # its modules changed
    return model


def uses_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())


# Where each travelling tensor lives: (name, its module's parameter or buffer dict, key). Read
# through the dict, so a tensor replaced in place (`to(device)`) is still found; `add_lora`, the
# only code that swaps a built model's modules, forgets the model's entry.
Place = tuple[str, dict[str, Tensor | None], str]
_PLACES: WeakKeyDictionary[nn.Module, tuple[Place, ...]] = WeakKeyDictionary()


def _places(model: nn.Module) -> tuple[Place, ...]:
    """`federated_state`'s names and places, found once per model: `state_dict` walks every
    submodule and copies every tensor's handle on each call (0.1 ms, three times per client-round
    in a simulation worker)."""
    if (places := _PLACES.get(model)) is None:
        lora = uses_lora(model)
        found = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if lora and not _travels(name):
                continue
            owner_name, _, key = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            held = owner._parameters if key in owner._parameters else owner._buffers
            assert held[key] is tensor, f"'{name}' is not where state_dict found it"
            found.append((name, held, key))
        places = _PLACES[model] = tuple(found)
    return places


def _live_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {name: held[key] for name, held, key in _places(model)}  # type: ignore[misc]


def federated_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors the federation sends, screens, aggregates and checkpoints: with LoRA, the
    adapters and the head only; without, every tensor (as before LoRA existed). Detached, as
    `state_dict` gives them."""
    return {name: tensor.detach() for name, tensor in _live_tensors(model).items()}


def load_federated_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load what travelled; with LoRA the frozen base stays as this side built it. Strict either
    way: a tensor missing or extra, or of another shape, is an error, never silently ignored.

    Copies into the model's own tensors, as `load_state_dict` does, without its walk over every
    submodule and hook: a third of a millisecond per load, paid twice per client-round by a
    simulation worker (train, evaluate)."""
    targets = _live_tensors(model)
    if state.keys() != targets.keys():
        missing = sorted(set(targets) - set(state))[:3]
        extra = sorted(set(state) - set(targets))[:3]
        expected = "adapters and head" if uses_lora(model) else "tensors"
        raise RuntimeError(
            f"received tensors are not this model's {expected} (missing {missing}, extra {extra})"
        )
    for name, target in targets.items():
        if state[name].shape != target.shape:
            raise RuntimeError(
                f"received '{name}' has shape {list(state[name].shape)}, this model's "
                f"{list(target.shape)}"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(state[name])


def _travels(name: str) -> bool:
    return name.startswith(HEAD) or any(f".{adapter}." in name for adapter in ADAPTERS)
