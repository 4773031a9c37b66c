"""The site executor's pull of a task's input (client/flower_runtime.py), against a SuperNode's
Runtime API that answers as Flower 1.42's does when it abandons a task: the run stopped while the
SuperNode downloaded the message, so the task stays open and its content never arrives.

Flower's own pull retries such a task for up to two hours, and the site, which answers one task
at a time, would answer nothing else meanwhile (a coordinator restarted mid-run found its sites
silent). The bounded pull gives up when the message's time to live runs out.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesResponse,
    PullTaskInputResponse,
)
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run

from client.flower_runtime import CLIENT_APP_TASK, ClaimedTask, MessageExpired
from tests.test_forged_arrays import GLOBAL, task_identity  # noqa: F401  (fixture)

RUN_ID = 7


class SuperNodeRuntime:
    """The four Runtime API calls a task's input takes, answered from memory. `content_arrives`
    False: the message is stored but its content never is, as for an abandoned task."""

    def __init__(self, message: Message, content_arrives: bool) -> None:
        self.message, self.content_arrives = message, content_arrives
        self.objects = {key: obj.deflate() for key, obj in get_all_nested_objects(message).items()}
        self.confirmed = False

    def PullTaskInput(self, _request: object) -> PullTaskInputResponse:
        context = Context(RUN_ID, 1, {}, RecordDict(), {})
        fab = Fab("0" * 64, b"an app package", {})
        return PullTaskInputResponse(
            task_id=3, context=context_to_proto(context), run=run_to_proto(Run.create_empty(RUN_ID)),
            fab=fab_to_proto(fab),
        )  # fmt: skip

    def PullMessages(self, _request: object) -> PullAppMessagesResponse:
        tree: ObjectTree = get_object_tree(self.message)
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(self.message)], message_object_trees=[tree]
        )

    def PullObject(self, request: object) -> PullObjectResponse:
        if not self.content_arrives:
            return PullObjectResponse(object_found=True, object_available=False)
        content = self.objects[request.object_id]  # type: ignore[attr-defined]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, _request: object) -> object:
        self.confirmed = True
        return object()

    def SendTaskHeartbeat(self, _request: object) -> object:
        return object()

    def close(self) -> None:
        pass


def train_message(ttl: float, sent_seconds_ago: float = 0.0) -> Message:
    message = Message(RecordDict({"arrays": GLOBAL}), dst_node_id=1,
                      message_type="train", ttl=ttl)  # fmt: skip
    message.metadata.created_at -= sent_seconds_ago
    return message


def claimed(runtime: SuperNodeRuntime) -> ClaimedTask:
    task = ClaimedTask("127.0.0.1:9", token="t", task_type=CLIENT_APP_TASK)
    task._client.close()
    task._client = runtime  # type: ignore[assignment]
    return task


def test_a_task_whose_content_never_arrives_is_given_up_when_its_message_expires():
    with claimed(SuperNodeRuntime(train_message(ttl=2.0), content_arrives=False)) as task:
        started = time.monotonic()
        with pytest.raises(MessageExpired, match=r"run 7: its train message expired"):
            task.pull_input()
        assert time.monotonic() - started < 6.0  # the message's 2 s, not Flower's two hours


def test_a_message_past_its_time_to_live_is_not_even_downloaded():
    runtime = SuperNodeRuntime(train_message(ttl=30.0, sent_seconds_ago=31.0), content_arrives=True)
    with claimed(runtime) as task, pytest.raises(MessageExpired):
        task.pull_input()
    assert not runtime.confirmed


def test_a_live_message_arrives_whole():
    message = train_message(ttl=30.0)
    runtime = SuperNodeRuntime(message, content_arrives=True)
    with claimed(runtime) as task:
        given = task.pull_input()
    assert runtime.confirmed and given.run_id == RUN_ID and given.package == b"an app package"
    assert given.message.metadata.message_id == message.object_id
    received = given.message.content["arrays"]
    assert list(received) == list(GLOBAL)
    assert all((received[k].numpy() == GLOBAL[k].numpy()).all() for k in GLOBAL)
