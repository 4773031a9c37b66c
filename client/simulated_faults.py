"""Dropouts and stragglers for rehearsals: a seeded share of simulated clients fails or is late.

A real federation loses sites mid-round (a crashed node, a laptop that went to sleep) and waits on
slow ones; a strategy that only ever sees perfect rounds has not been tested. This ClientApp mod
makes that happen on purpose, in simulation only (a node with a `partition-id`; a real site is
never touched), and reproducibly: whether a client drops or straggles in a round is a pure function
of (seed, round, partition id), so every worker and every rerun agrees.

A dropped client answers its train message with an Error reply, which is how a crashed node looks
to the coordinator: the round loop counts it in `failed`. A straggler trains, then waits
`straggler-delay` seconds before replying, so its own train-seconds stay honest.
"""

from __future__ import annotations

import logging
import time
from enum import Enum

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.local_data import PARTITION_ID_KEY
from common.run_config import RunConfig, cached_run_config

DROPPED = 503  # error code of a simulated dropout: the service was unavailable

log = logging.getLogger(__name__)


class Fault(Enum):
    NONE = "none"
    DROP = "drop"
    STRAGGLE = "straggle"


def fault_for(config: RunConfig, server_round: int, partition_id: int) -> Fault:
    """One uniform draw per (seed, round, client): below dropout-fraction it drops, within the
    next straggler-fraction it straggles, so the two never overlap."""
    if config.dropout_fraction == 0 and config.straggler_fraction == 0:
        return Fault.NONE  # no draw: seeding a generator costs 50 us every client-round
    draw = np.random.default_rng([config.seed, server_round, partition_id]).random()
    if draw < config.dropout_fraction:
        return Fault.DROP
    if draw < config.dropout_fraction + config.straggler_fraction:
        return Fault.STRAGGLE
    return Fault.NONE


def simulated_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    settings = msg.content.config_records.get("config") if msg.has_content() else None
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or settings is None  # a SecAgg+ stage message, not a request to train
        or PARTITION_ID_KEY not in context.node_config
    ):
        return call_next(msg, context)
    config = cached_run_config(context.run_config)
    server_round = int(settings.get("server-round", 0))
    fault = fault_for(config, server_round, int(context.node_config[PARTITION_ID_KEY]))
    if fault is Fault.DROP:
        return Message(
            Error(
                code=DROPPED,
                reason=f"dropped out in round {server_round} (simulated: "
                f"dropout-fraction = {config.dropout_fraction:g})",
            ),
            reply_to=msg,
        )
    reply = call_next(msg, context)
    if fault is Fault.STRAGGLE:
        time.sleep(config.straggler_delay)
    return reply
