"""The model a run federates, built alike on the coordinator and on every site.

With LoRA (lora-rank > 0) the frozen base never travels: each side rebuilds it from the same
init-checkpoint (a site loads the shipped or public file itself) or, without one, from the same
seeded fresh initialisation, and only adapters and head make up the global model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.hf_model import build_hf_classifier, hf_model_name
from common.lora import add_lora, federated_state
from common.model_factory import build_model
from common.pretrained_checkpoint import initial_state, require_shipped
from common.run_config import RunConfig
from common.schema import Schema


def build_federated_model(schema: Schema, config: RunConfig) -> nn.Module:
    """Without LoRA, the architecture (its weights come from the global model); with LoRA, the
    base from init-checkpoint or the seed, then adapters, seeded too, so every side agrees."""
    if not config.lora_rank:
        return build_model(schema, config)
    if config.init_checkpoint:
        require_shipped(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # as the ServerApp seeds: round 0 is LoRA-off's model
        if hf_model_name(config) is not None:  # the base from this side's own installed copy
            return add_lora(build_hf_classifier(schema, config, pretrained=True), config)
        state = initial_state(schema, config)
        model = build_model(schema, config)
        model.load_state_dict(state)
        return add_lora(model, config)


def initial_federated_state(schema: Schema, config: RunConfig) -> dict[str, Tensor]:
    """The first global model: what travels of the model every side builds."""
    if not config.lora_rank:
        return initial_state(schema, config)
    return federated_state(build_federated_model(schema, config))


def federated_layout(schema: Schema, config: RunConfig) -> dict[str, Tensor]:
    """What travels, for its names, shapes and dtypes only: built without reading any checkpoint,
    so a site unpacks a message before its policy and checks have looked at the run's settings."""
    model = build_model(schema, config)
    return federated_state(add_lora(model, config) if config.lora_rank else model)
