"""An in-process Flower Grid that hands each message to the real ClientApp, for fast loop tests.

It stands in for the SuperLink only: the ClientApp, its handlers, the strategies and Confide's round
loop are the real ones. A handler that raises becomes an error reply, as a SuperNode would send;
a `tamper` hook that returns None drops the reply, as if it had not arrived within the timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.packed_wire import model_layout
from common.packed_arrays import is_packed, unpack
from common.run_config import RunConfig

RUN_ID = 1


def named_arrays(record: ArrayRecord, config: RunConfig) -> ArrayRecord:
    """A model as the tests read it: by tensor name, unpacked if it travelled packed."""
    return unpack(record, model_layout(config)) if is_packed(record) else record


class LocalGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        run_config: dict,
        node_configs: dict[int, dict],
        tamper: Callable[[int, Message, Message], Message | None] | None = None,
    ) -> None:
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config=config,
                state=RecordDict(),
                run_config=run_config,
            )
            for node, config in node_configs.items()
        }
        self.tamper = tamper

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_src_node_id"] = 0
            try:
                reply = self.client_app(message, self.contexts[node])
            except Exception as error:  # a crashing client sends an error reply
                reply = Message(
                    Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=message
                )
            reply.metadata.__dict__["_src_node_id"] = node
            if self.tamper:
                reply = self.tamper(node, message, reply)
            if reply is not None:
                replies.append(reply)
        return replies

    # The round loop never calls these; a SuperLink would.
    def set_run(self, run):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError
