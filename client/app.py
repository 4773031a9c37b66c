"""The ClientApp: turn Flower messages into local training and evaluation, and back.

The same app runs on a hospital's SuperNode and inside Flower's simulation engine; only the node
config differs (a data file there, a partition id here). Each handler goes in two stages. First,
with no record read: the run's settings as the site acts on them and the received weights
(client/site_inputs.py), and the site's policy against the run's request
(client/privacy/policy.py); a refusal here names the message or the policy field. Then the
records: under DP nothing computed from them leaves except through the release gate
(client/privacy/), and an unexpected failure on them is answered with one fixed line, so not
even an exception's text depends on a record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.canaries import SiteAudit
from client.dp_mods import client_side_clipping
from client.local_data import (
    NodeConfigError,
    load_local_split,
    simulated_partition,
    site_name,
    site_privacy,
)
from client.packed_wire import packed_model
from client.privacy.evaluation import EVALUATION_BATCH_SIZE
from client.privacy.gate import NonFiniteRelease
from client.privacy.policy import node_policy
from client.privacy.site import RoundRequest, private_evaluate, private_train
from client.secure_aggregation import secure_aggregation
from client.simulated_faults import simulated_faults
from client.site_inputs import (
    DATA_PATH_KEY,
    ReceivedInputError,
    check_received_state,
    site_run_config,
)
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
from common.privacy_ledger import BudgetExhausted, LedgerError
from common.received_weights import LastDecoded, ReceivedArrayError
from common.run_config import RunConfig, RunConfigError
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
    RunConfigError,
    NodeConfigError,
    ReceivedArrayError,
    ReceivedInputError,
    NonFiniteRelease,
    InitCheckpointError,  # with LoRA, a base the site does not ship
    HFModelError,  # a Hugging Face model the site has not installed, or another copy of it
)
RECORDS_FAILED = (
    "the site could not compute its reply from its records; its operator's log says why"
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
    """The received weights in this worker's model, checked against it first; `fresh` for
    DP-SGD, because Opacus adds its hooks to the module it wraps and a reused module would
    collect them round after round."""
    model = (
        build_federated_model(_worker_schema(config), config) if fresh else _worker_model(config)
    )
    if "arrays" not in msg.content.array_records:
        raise ReceivedInputError("refused: the message holds no model ('arrays')")
    received = _received_weights(msg.content["arrays"])
    check_received_state(received, federated_state(model))
    load_federated_state(model, received)
    return model


def _request(msg: Message) -> RoundRequest:
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round", 0) if config else 0
    if type(server_round) is not int or not 0 <= server_round < 2**31:
        raise ReceivedInputError("refused: the message's server-round is not a round number")
    # The deadline is when the coordinator stops waiting (server/federation.py `outgoing`).
    deadline = msg.metadata.created_at + msg.metadata.ttl
    return RoundRequest(str(msg.metadata.run_id), server_round, deadline, choose_device())


def _node_name(config: RunConfig, context: Context) -> str:
    """The site's name, before any record is read (a simulated site's from the task's plan)."""
    if DATA_PATH_KEY in context.node_config:
        return site_name(context.node_config)
    partition = simulated_partition(context.node_config)
    try:
        names, _ = partition_plan(config)
    except HFModelError:  # the simulated task cannot even be tokenized: no names to give
        return f"partition {partition}"
    return names[partition]


def _refusal(msg: Message, name: str, error: Exception) -> Message:
    log.warning("%s refuses: %s", name, error)
    return Message(Error(code=REFUSED, reason=f"{name}: {error}"), reply_to=msg)


def _expired(msg: Message, name: str, error: RoundExpired) -> Message:
    log.warning("%s: %s", name, error)
    return Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=str(error)), reply_to=msg)


Handler = Callable[[Message, Context, RunConfig, str, SitePolicy], RecordDict]


def _answer(msg: Message, context: Context, handler: Handler) -> Message:
    """Check everything the message asks for before a record is read, then run `handler` on the
    records: a refusal carries its one line, anything else a fixed one."""
    name = "site"
    try:
        config = site_run_config(context)
        name = _node_name(config, context)
        policy = node_policy(config, context.node_config, name)
        check_request(policy, config)
        return Message(content=handler(msg, context, config, name, policy), reply_to=msg)
    except REFUSALS as refusal:
        return _refusal(msg, name, refusal)
    except RoundExpired as expired:
        return _expired(msg, name, expired)
    except Exception:  # the records' path failed: its text may quote a record, so it stays here
        log.exception("%s: the ClientApp failed on a %s message", name, msg.metadata.message_type)
        return Message(Error(code=REFUSED, reason=f"{name}: {RECORDS_FAILED}"), reply_to=msg)


def _train_plain(
    model: torch.nn.Module,
    split: ClientSplit,
    config: RunConfig,
    msg: Message,
    request: RoundRequest,
) -> dict[str, float]:
    loader = TensorBatches(
        split.train, config.batch_size, shuffle=True, seed=config.seed + request.server_round
    )
    optimizer = make_optimizer(config.optimizer, model, config.learning_rate, config.weight_decay)
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_epochs(
        model, loader, optimizer, config.local_epochs, request.device, proximal_mu,
        deadline=request.deadline,
    )  # fmt: skip
    return {
        "num-examples": len(split.train),
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-seconds": result.seconds,
    }


def _train_reply(
    msg: Message, context: Context, config: RunConfig, name: str, policy: SitePolicy
) -> RecordDict:
    request = _request(msg)
    model = _received_model(msg, config, fresh=config.dp)
    split = load_local_split(config, context.node_config, policy)
    audit = SiteAudit.for_node(config, context.node_config, split)  # `confide audit` only
    split = audit.training_split(split, len(_worker_schema(config).classes))
    with audit.round(request.server_round) as canaries:
        if config.dp:
            site = site_privacy(config, context.node_config, name, policy)
            metrics = private_train(
                model, split, config, site, request, canaries.for_step if canaries else None
            )
        else:
            metrics = _train_plain(model, split, config, msg, request)
    return RecordDict(
        {
            "arrays": array_record(federated_state(model)),
            "metrics": MetricRecord({CLIENT_WEIGHT: 1, **metrics}),
            "client": ConfigRecord({"name": name}),
        }
    )


@app.train(mods=[secure_aggregation, client_side_clipping])  # SecAgg+ must see the final reply
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train_reply)


def _evaluate_reply(
    msg: Message, context: Context, config: RunConfig, name: str, policy: SitePolicy
) -> RecordDict:
    request = _request(msg)
    stop_if_expired(request.deadline)  # under DP, a late answer would still be charged
    model = _received_model(msg, config)
    split = load_local_split(config, context.node_config, policy)
    if config.dp:
        site = site_privacy(config, context.node_config, name, policy)
        metrics = private_evaluate(model, split, config, site, request)
    else:
        result = evaluate(model, split.test, EVALUATION_BATCH_SIZE, request.device)
        metrics = {
            "num-examples": result.num_examples,
            "loss": result.loss,
            "accuracy": result.accuracy,
        }
    return RecordDict(
        {
            "metrics": MetricRecord({CLIENT_WEIGHT: 1, **metrics}),
            "client": ConfigRecord({"name": name}),
        }
    )


@app.evaluate()
def evaluate_global_model(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate_reply)
