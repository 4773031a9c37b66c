"""The ClientApp: turn Flower messages into local training and evaluation, and back.

The same app runs on a hospital's SuperNode and inside Flower's simulation engine; only the node
config differs (a data file there, a partition id here). The site's policy (client/node_policy.py)
is checked against the run's request before any record is read; under DP, nothing computed from
the records leaves except through a mechanism charged to the site's ledger.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.canaries import SiteAudit
from client.dp_mods import client_side_clipping
from client.local_data import DATA_PATH_KEY, load_local_split, site_name, site_privacy
from client.node_policy import node_policy
from client.packed_wire import packed_model
from client.private_release import EVALUATION_BATCH_SIZE, evaluate_privately
from client.private_training import plan_run, train_privately
from client.secure_aggregation import secure_aggregation
from client.simulated_faults import simulated_faults
from client.training import (
    RoundExpired,
    choose_device,
    make_optimizer,
    stop_if_expired,
    train_epochs,
)
from common.evaluation import TensorBatches, evaluate
from common.federated_model import build_federated_model
from common.hf_model import HFModelError
from common.lora import federated_state, load_federated_state
from common.packed_arrays import array_record
from common.partition import ClientSplit, partition_plan
from common.pretrained_checkpoint import InitCheckpointError
from common.privacy import PrivacyConfigError
from common.privacy_ledger import BudgetExhausted, LedgerEntry, LedgerError
from common.received_weights import LastDecoded
from common.run_config import RunConfig, cached_run_config
from common.schema import Schema
from common.site_policy import REFUSED, PolicyError, PolicyRefusal, SitePolicy, check_request
from common.tasks import task_schema

CLIENT_WEIGHT = "client-weight"  # uniform weight, for coordinators that average clients equally
REFUSALS = (
    BudgetExhausted,
    LedgerError,
    PrivacyConfigError,
    PolicyError,
    PolicyRefusal,
    InitCheckpointError,  # with LoRA, a base the site does not ship
    HFModelError,  # a Hugging Face model the site has not installed, or another copy of it
)

log = logging.getLogger(__name__)
# simulated_faults: dropouts/stragglers in simulation, when configured; packed_model: one array
# on the wire for the whole model, named arrays inside
app = ClientApp(mods=[simulated_faults, packed_model])


@lru_cache(maxsize=2)
def _worker_schema(config: RunConfig) -> Schema:
    """Read once per process, as the model is built once: parsing its TOML file took 0.3 ms,
    paid every client-round."""
    return task_schema(config)


@lru_cache(maxsize=2)
def _worker_model(config: RunConfig) -> torch.nn.Module:
    """Built once per process: a simulation worker serves thousands of client-rounds of one model."""
    return build_federated_model(_worker_schema(config), config)


_received_weights = LastDecoded()  # a worker's clients of a round all receive one global model


def _received_model(msg: Message, config: RunConfig, fresh: bool = False) -> torch.nn.Module:
    """The received weights in this worker's model; `fresh` for DP-SGD, because Opacus adds its
    hooks to the module it wraps and a reused module would collect them round after round."""
    model = (
        build_federated_model(_worker_schema(config), config) if fresh else _worker_model(config)
    )
    load_federated_state(model, _received_weights(msg.content["arrays"]))
    return model


def _server_round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    return int(config.get("server-round", 0)) if config else 0


def _deadline(msg: Message) -> float:
    """When the coordinator stops waiting for the reply (server/federation.py `outgoing`)."""
    return msg.metadata.created_at + msg.metadata.ttl


def _accepted_split(config: RunConfig, context: Context) -> tuple[SitePolicy, ClientSplit]:
    """The site's policy first: a real site refuses a forbidden request before reading a record
    (a simulated site is found by its share's name, so there the share is drawn first)."""
    node_config = context.node_config
    if DATA_PATH_KEY in node_config:
        policy = node_policy(config, node_config, site_name(node_config))
        check_request(policy, config)
        return policy, load_local_split(config, node_config)
    split = load_local_split(config, node_config)
    policy = node_policy(config, node_config, split.name)
    check_request(policy, config)
    return policy, split


def _refusal(msg: Message, name: str, error: Exception) -> Message:
    log.warning("%s refuses: %s", name, error)
    return Message(Error(code=REFUSED, reason=f"{name}: {error}"), reply_to=msg)


def _expired(msg: Message, name: str, error: RoundExpired) -> Message:
    log.warning("%s: %s", name, error)
    return Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=str(error)), reply_to=msg)


def _node_name(config: RunConfig, context: Context) -> str:
    """A name for a refusal sent before the site's records (and so its split) are at hand."""
    if DATA_PATH_KEY in context.node_config:
        return site_name(context.node_config)
    partition = int(context.node_config["partition-id"])
    try:
        names, _ = partition_plan(config)
    except HFModelError:  # the simulated task cannot even be tokenized: no names to give
        return f"partition {partition}"
    return names[partition]


def _train_plain(
    model: torch.nn.Module, split: ClientSplit, config: RunConfig, msg: Message
) -> dict[str, float]:
    server_round = _server_round(msg)
    loader = TensorBatches(
        split.train, config.batch_size, shuffle=True, seed=config.seed + server_round
    )
    optimizer = make_optimizer(config.optimizer, model, config.learning_rate, config.weight_decay)
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_epochs(
        model, loader, optimizer, config.local_epochs, choose_device(), proximal_mu,
        deadline=_deadline(msg),
    )  # fmt: skip
    return {
        "num-examples": len(split.train),
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-seconds": result.seconds,
    }


def _train_private(
    model: torch.nn.Module,
    split: ClientSplit,
    config: RunConfig,
    policy: SitePolicy,
    msg: Message,
    context: Context,
) -> dict[str, float]:
    private = train_privately(
        model,
        split.train,
        config,
        site_privacy(config, context.node_config, split, policy),
        run_id=str(msg.metadata.run_id),
        server_round=_server_round(msg),
        device=choose_device(),
        deadline=_deadline(msg),
    )
    metrics = {
        "num-examples": private.num_examples,
        "noise-multiplier": private.noise_multiplier,
        "epsilon-round": private.epsilon_round,
        "epsilon": private.epsilon_total,
        "delta": private.delta,
    }
    if config.training_metrics == "exact":  # the run asked, the site's policy allowed it
        metrics |= {
            "train-loss": private.result.loss,
            "train-accuracy": private.result.accuracy,
            "train-seconds": private.result.seconds,
        }
    return metrics


@app.train(mods=[secure_aggregation, client_side_clipping])  # SecAgg+ must see the final reply
def train(msg: Message, context: Context) -> Message:
    config = cached_run_config(context.run_config)
    split = None
    try:
        policy, split = _accepted_split(config, context)
        audit = SiteAudit.for_node(config, context.node_config, split)  # `confide audit` only
        split = audit.training_split(split, len(_worker_schema(config).classes))
        model = _received_model(msg, config, fresh=config.dp)
        with audit.round(_server_round(msg)):
            if config.dp:
                metrics = _train_private(model, split, config, policy, msg, context)
            else:
                metrics = _train_plain(model, split, config, msg)
    except REFUSALS as refusal:
        return _refusal(msg, split.name if split else _node_name(config, context), refusal)
    except RoundExpired as expired:
        return _expired(msg, split.name if split else _node_name(config, context), expired)
    content = RecordDict(
        {
            "arrays": array_record(federated_state(model)),
            "metrics": MetricRecord({CLIENT_WEIGHT: 1, **metrics}),
            "client": ConfigRecord({"name": split.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate_private(
    model: torch.nn.Module,
    split: ClientSplit,
    config: RunConfig,
    policy: SitePolicy,
    msg: Message,
    context: Context,
) -> dict[str, float]:
    """One Gaussian mechanism per reply, charged before it leaves; off if the policy says so."""
    if policy.evaluation == "off":
        raise PolicyRefusal(
            f"refused by site policy ({policy.source}): evaluation = 'off', but the run asks "
            "for an evaluation reply"
        )
    site = site_privacy(config, context.node_config, split, policy)
    run_id = str(msg.metadata.run_id)
    plan = plan_run(config, site, run_id, len(split.train))
    answered = sum(e.run_id == run_id and e.purpose == "evaluate" for e in site.ledger.entries())
    if answered >= plan.evaluations:  # a coordinator may not drain the budget through evaluation
        raise BudgetExhausted(
            f"this run's {plan.evaluations} planned evaluation replies are spent; the site answers "
            "no more"
        )
    assert plan.evaluation_sigma is not None
    entry = LedgerEntry(
        run_id, _server_round(msg), plan.evaluation_sigma, 1.0, 1, purpose="evaluate"
    )
    epsilon = site.ledger.charge(site.budget, entry, site.source)
    released = evaluate_privately(model, split.test, plan.evaluation_sigma, choose_device())
    return {
        "num-examples": released.num_examples,
        "loss": released.loss,
        "accuracy": released.accuracy,
        "epsilon": epsilon,
        "delta": site.budget.target_delta,
    }


@app.evaluate()
def evaluate_global_model(msg: Message, context: Context) -> Message:
    config = cached_run_config(context.run_config)
    split = None
    try:
        stop_if_expired(_deadline(msg))  # under DP, a late answer would still be charged
        policy, split = _accepted_split(config, context)
        model = _received_model(msg, config)
        if config.dp:
            metrics = _evaluate_private(model, split, config, policy, msg, context)
        else:
            result = evaluate(model, split.test, EVALUATION_BATCH_SIZE, choose_device())
            metrics = {
                "num-examples": result.num_examples,
                "loss": result.loss,
                "accuracy": result.accuracy,
            }
    except REFUSALS as refusal:
        return _refusal(msg, split.name if split else _node_name(config, context), refusal)
    except RoundExpired as expired:
        return _expired(msg, split.name if split else _node_name(config, context), expired)
    content = RecordDict(
        {
            "metrics": MetricRecord({CLIENT_WEIGHT: 1, **metrics}),
            "client": ConfigRecord({"name": split.name}),
        }
    )
    return Message(content=content, reply_to=msg)
