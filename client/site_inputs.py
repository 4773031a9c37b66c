"""What a coordinator's message makes a site act on, checked before any record is read.

Everything a coordinator sends is hostile until checked here: the run config (typed and bounded
by `RunConfig`, which every side validates alike), the files it would have the site open (none:
on a real site the schema is the one the site joined with, `schema-path` in its node config,
whatever the run's `schema-file` says; models and checkpoints are named, never paths, see
common/hf_model.py and common/pretrained_checkpoint.py), and the weights (finite, bounded, and
of the names, shapes and dtypes of the site's own model). A refusal here depends only on the
message and the site's own settings, so it says nothing about the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import lru_cache

import torch
from flwr.app import Context

from common.run_config import RunConfig, cached_run_config

DATA_PATH_KEY = "data-path"  # set by `confide join` on a real site
SCHEMA_PATH_KEY = "schema-path"  # set by `confide join --schema` for a custom task
MAX_RECEIVED_WEIGHT = 1e4
"""No weight of a model that trains may be larger in magnitude: a finite value this large is a
crafted one, made to overflow activations (to inf, then NaN) on chosen records."""


class ReceivedInputError(ValueError):
    """A message the site refuses before reading any record; the text names only the message."""


def site_run_config(context: Context) -> RunConfig:
    """The run's settings as this node acts on them: a real site reads the schema it joined
    with, never a path the coordinator names (a simulated node is the data scientist's own)."""
    config = cached_run_config(context.run_config)
    if DATA_PATH_KEY not in context.node_config:
        return config
    return _on_site(config, str(context.node_config.get(SCHEMA_PATH_KEY, "")))


@lru_cache(maxsize=8)
def _on_site(config: RunConfig, schema_path: str) -> RunConfig:
    if config.task == "custom" and not schema_path:
        raise ReceivedInputError(
            "refused: the run is a custom task, and this site joined without a schema of its "
            "own (confide join --schema)"
        )
    return dataclasses.replace(config, schema_file=schema_path, data_file="")


def check_received_state(
    received: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Every received tensor is one the site's model has, of its shape and dtype, finite and at
    most MAX_RECEIVED_WEIGHT in magnitude; one line names the first that is not."""
    if received.keys() != expected.keys():
        missing = sorted(set(expected) - set(received))[:3]
        extra = sorted(set(received) - set(expected))[:3]
        raise ReceivedInputError(
            f"refused: the received model is not this site's (missing {missing}, extra {extra})"
        )
    for name, tensor in received.items():
        own = expected[name]
        if tensor.shape != own.shape or tensor.dtype != own.dtype:
            raise ReceivedInputError(
                f"refused: received '{name}' is {tensor.dtype}{list(tensor.shape)}, this site's "
                f"model has {own.dtype}{list(own.shape)}"
            )
    flat = torch.cat([tensor.reshape(-1).float() for tensor in received.values()])
    if not bool(torch.isfinite(flat).all()):
        raise ReceivedInputError("refused: the received model holds a value that is not finite")
    if len(flat) and float(flat.abs().max()) > MAX_RECEIVED_WEIGHT:
        raise ReceivedInputError(
            f"refused: the received model holds a weight above {MAX_RECEIVED_WEIGHT:g} in magnitude"
        )
