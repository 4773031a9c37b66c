"""The ClientApp: turn Flower messages into local training and evaluation, and back.

The same app runs on a hospital's SuperNode and inside Flower's simulation engine; only the node
config differs (a data file there, a partition id here).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.dp_mods import client_side_clipping
from client.local_data import load_local_split, open_ledger
from client.private_training import train_privately
from client.secure_aggregation import secure_aggregation
from client.simulated_faults import simulated_faults
from client.training import choose_device, make_optimizer, train_epochs
from common.evaluation import evaluate, make_loader
from common.model_factory import build_model
from common.partition import ClientSplit
from common.privacy import PrivacyConfigError
from common.privacy_ledger import BudgetExhausted, LedgerError
from common.received_weights import torch_state_dict
from common.run_config import RunConfig, cached_run_config
from common.tasks import task_schema

EVALUATION_BATCH_SIZE = 256
CLIENT_WEIGHT = "client-weight"  # uniform weight, for coordinators that average clients equally
REFUSED = 403  # error code of a reply that declines to train (privacy budget, broken ledger)

log = logging.getLogger(__name__)
app = ClientApp(mods=[simulated_faults])  # dropouts/stragglers: in simulation, when configured


@lru_cache(maxsize=2)
def _worker_model(config: RunConfig) -> torch.nn.Module:
    """Built once per process: a simulation worker serves thousands of client-rounds of one model."""
    return build_model(task_schema(config), config)


def _received_model(msg: Message, config: RunConfig, fresh: bool = False) -> torch.nn.Module:
    """The received weights in this worker's model; `fresh` for DP-SGD, because Opacus adds its
    hooks to the module it wraps and a reused module would collect them round after round."""
    model = build_model(task_schema(config), config) if fresh else _worker_model(config)
    model.load_state_dict(torch_state_dict(msg.content["arrays"]))
    return model


def _train_plain(
    model: torch.nn.Module, split: ClientSplit, config: RunConfig, msg: Message
) -> dict[str, float]:
    server_round = int(msg.content["config"].get("server-round", 0))
    loader = make_loader(
        split.train, config.batch_size, shuffle=True, seed=config.seed + server_round
    )
    optimizer = make_optimizer(config.optimizer, model, config.learning_rate, config.weight_decay)
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_epochs(
        model, loader, optimizer, config.local_epochs, choose_device(), proximal_mu
    )
    return {
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-seconds": result.seconds,
    }


def _train_private(
    model: torch.nn.Module, split: ClientSplit, config: RunConfig, msg: Message, context: Context
) -> dict[str, float]:
    ledger = open_ledger(config, context.node_config, split)
    private = train_privately(
        model,
        split.train,
        config,
        config.privacy_budget(context.node_config),
        ledger,
        run_id=str(msg.metadata.run_id),
        server_round=int(msg.content["config"].get("server-round", 0)),
        device=choose_device(),
    )
    return {
        "train-loss": private.result.loss,
        "train-accuracy": private.result.accuracy,
        "train-seconds": private.result.seconds,
        "noise-multiplier": private.noise_multiplier,
        "epsilon-round": private.epsilon_round,
        "epsilon": private.epsilon_total,
        "delta": private.delta,
    }


@app.train(mods=[secure_aggregation, client_side_clipping])  # SecAgg+ must see the final reply
def train(msg: Message, context: Context) -> Message:
    config = cached_run_config(context.run_config)
    split = load_local_split(config, context.node_config)
    model = _received_model(msg, config, fresh=config.dp)
    try:
        if config.dp:
            metrics = _train_private(model, split, config, msg, context)
        else:
            metrics = _train_plain(model, split, config, msg)
    except (BudgetExhausted, LedgerError, PrivacyConfigError) as refusal:
        log.warning("%s refuses to train: %s", split.name, refusal)
        return Message(Error(code=REFUSED, reason=f"{split.name}: {refusal}"), reply_to=msg)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"num-examples": len(split.train), CLIENT_WEIGHT: 1, **metrics}
            ),
            "client": ConfigRecord({"name": split.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global_model(msg: Message, context: Context) -> Message:
    config = cached_run_config(context.run_config)
    split = load_local_split(config, context.node_config)
    model = _received_model(msg, config)
    result = evaluate(model, split.test, EVALUATION_BATCH_SIZE, choose_device())
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            CLIENT_WEIGHT: 1,
            "loss": result.loss,
            "accuracy": result.accuracy,
        }
    )
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"name": split.name})})
    return Message(content=content, reply_to=msg)
