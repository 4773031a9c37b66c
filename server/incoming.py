"""Replies taken in one by one, and FedAvg's mean folded in as they come.

Flower's `send_and_receive` returns a round's replies all at once, when the last has arrived, and
its FedAvg then averages the list: the coordinator holds every client's model at the same time,
about 100 KB a reply, 1 GiB at 10,000 virtual banks (BENCHMARKS.md, "10,000 virtual banks"). Here
the simulation's replies are pulled as they arrive (the same public `push_messages` /
`pull_messages` loop as Flower's), and where the strategy's aggregate is a weighted mean (FedAvg,
FedProx) each screened update is added to a running sum and its model let go at once: the
coordinator holds one model, not one per client. Every other strategy (robust rules, the
differential-privacy wrappers, FedAdam) gets the full list as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.superlink.grid import InMemoryGrid

from common.flower_compat import stored_replies
from common.received_weights import ndarray

WEIGHT_KEY = "num-examples"  # screened on every update (server/update_validation.py)
MEAN_STRATEGIES = (FedAvg, FedProx)  # exactly these types: a subclass may aggregate otherwise
FULL_PULL_EVERY = 10  # polls of 0.1 s: every pending message asked about once a second


def replies_as_they_arrive(
    grid: Grid, messages: list[Message], timeout: float
) -> Iterable[Message]:
    """The replies to `messages` within `timeout`, each as soon as the simulation's LinkState has
    it; other grids (a deployment's, which polls every 3 s, and the tests') answer through their
    own `send_and_receive`."""
    if isinstance(grid, InMemoryGrid):
        return _pulled(grid, messages, timeout)
    return grid.send_and_receive(messages, timeout=timeout)


def _pulled(grid: InMemoryGrid, messages: list[Message], timeout: float) -> Iterator[Message]:
    """InMemoryGrid.send_and_receive's loop, yielding instead of collecting, and asking the
    LinkState only about answered messages between full pulls. Flower's `pull_messages` checks
    every message it is asked about, several passes in Python under the LinkState's lock: asked
    about all pending ones every 0.1 s, that cost 0.6 ms per client-round at 1,000 clients,
    growing with the round's length. A full pull once a second still brings the replies the
    LinkState makes up itself (a message expired, its node gone), a second later at most."""
    pending = set(grid.push_messages(messages))
    answered = stored_replies(getattr(grid, "state", None))
    deadline = time.time() + timeout
    polls = 0
    while pending and time.time() < deadline:
        if answered is None or polls % FULL_PULL_EVERY == 0:
            asked = pending
        else:
            asked = {message_id for message_id in pending if message_id in answered}
        replies = list(grid.pull_messages(asked)) if asked else []
        pending.difference_update(reply.metadata.reply_to_message_id for reply in replies)
        yield from replies
        polls += 1
        if pending:
            time.sleep(grid.pull_interval)


def folds_mean(strategy: Strategy) -> bool:
    """Whether the strategy's aggregate is the mean of the updates weighted by `num-examples`."""
    return type(strategy) in MEAN_STRATEGIES and strategy.weighted_by_key == WEIGHT_KEY


class RunningMean:
    """FedAvg's weighted mean of screened updates, summed in float64 as they arrive."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.weight = 0.0

    def add(self, reply: Message) -> None:
        """Add a screened update (one ArrayRecord, a valid `num-examples`) and drop its model
        from the reply, which keeps its metrics and name for the round's record."""
        (key,) = reply.content.array_records
        weight = float(next(iter(reply.content.metric_records.values()))[WEIGHT_KEY])
        for name, array in reply.content.array_records[key].items():
            values = ndarray(array, name).astype(np.float64, copy=False) * weight
            if name in self.sums:
                self.sums[name] += values
            else:
                self.sums[name] = values
        self.weight += weight
        del reply.content[key]

    def mean(self) -> ArrayRecord | None:
        """None when nothing was added, as a strategy answers an empty round."""
        if not self.sums:
            return None
        return ArrayRecord({name: Array(total / self.weight) for name, total in self.sums.items()})
