"""The site executor's hand on its SuperNode's Runtime API: every Flower internal it needs, here.

`flower-supernode --isolation process` spawns no ClientApp: each message becomes a task that an
outside process claims over the SuperNode's loopback Runtime API (protobuf over HTTP), the protocol
Flower's own `flwr-clientapp` and SuperExec speak. Flower has no public client for it, so this
module borrows their functions (task claim, input pull, reply push) and is the only Confide module
that names them. They are Flower 1.42 internals, though none is a private (`_x`) name: on another
Flower, importing this module fails with the LibraryVersionError line of common/flower_compat.py
(an ImportError), before anything starts, instead of an AttributeError in the middle of a round.
"""

# ruff: noqa: E402  (the version check must run before the internal imports below)

from __future__ import annotations

from common.flower_compat import require_flower

require_flower("client/flower_runtime.py")

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
from flwr.app import Context, Message
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger(__name__)

CLIENT_APP_TASK = str(TaskType.CLIENT_APP)
MESSAGE_TASKS = [CLIENT_APP_TASK, str(TaskType.AGENT_APP)]
REFUSED_APP = ErrorCode.INVALID_FAB  # Flower's own code for "this node will not run that app"
APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# Flower expires a claimed task after two missed 30 s heartbeats and answers "ClientApp stopped
# responding" in its place; a beat every 10 s keeps a long training round claimed.
HEARTBEAT_SECONDS = 10.0
# The SuperNode makes a task a moment before it stores the task's message, and stores the message's
# content only once it has it all from the SuperLink.
MESSAGE_ARRIVAL_SECONDS = 10.0
CONTENT_POLL_CAP_SECONDS = 1.0  # loopback polls are cheap; Flower's 10 s cap would idle the site
COMPONENT = "confide-site-executor"
RuntimeUnavailable = httpx.HTTPError  # the SuperNode is not (yet, or any more) answering


def build_app_package(root: Path) -> bytes:
    """The app package `flwr run` would build from `root` (Flower's own rules, deterministic)."""
    return build_fab_from_disk(root)


@dataclass(frozen=True)
class TaskInput:
    """What one task brings: the message, its context (node and run config) and the run's app
    package, which is only ever read as bytes."""

    task_type: str
    run_id: int
    package: bytes
    message: Message
    context: Context


class MessageExpired(Exception):
    """The task's message outlived its time to live before it could be read: its run stopped,
    or its round is over, and a reply would be dropped anyway, so the site does no work for it."""


class ClaimedTask:
    """One claimed task: a client that carries its token, and heartbeats that keep the claim."""

    def __init__(self, address: str, token: str, task_type: str) -> None:
        self.task_type = task_type
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT),
                          RuntimeTokenHttpInterceptor(token)],
        )  # fmt: skip
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            try:
                self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception as error:  # a missed beat is retried; never fatal
                log.debug("task heartbeat failed: %s", error)

    def pull_input(self) -> TaskInput:
        """Flower's `pull_task_input`, bounded by the message's time to live. A SuperNode that
        finds the message's run stopped while it downloads the content abandons the task without
        closing it; Flower's unbounded pull (500 tries, up to two hours) would hold this
        single-file site executor on that dead task and leave every later message unanswered."""
        task = self._client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
        TaskIdentity.node_id = task.context.node_id
        context, fab = context_from_proto(task.context), fab_from_proto(task.fab)
        pulled = self._pull_message_tree()
        metadata = pulled.messages_list[0].metadata
        seconds_left = metadata.created_at + metadata.ttl - time.time()
        expired = MessageExpired(
            f"run {task.run.run_id}: its {metadata.message_type} message expired (time to live "
            f"{metadata.ttl:g} s) before its content arrived; not answered"
        )
        if seconds_left <= 0:
            raise expired
        node = Node(node_id=context.node_id)
        try:
            message = pull_and_inflate_object_from_tree(
                pulled.message_object_trees[0],
                make_pull_object_fn_protobuf(self._client.PullObject, node, task.run.run_id),
                make_confirm_message_received_fn_protobuf(
                    self._client.ConfirmMessageReceived, node, task.run.run_id
                ),
                return_type=Message,
                max_time=seconds_left,
                backoff_cap=CONTENT_POLL_CAP_SECONDS,
            )
        except ObjectPullError:
            raise expired from None
        message.metadata.__dict__["_message_id"] = pulled.message_object_trees[0].object_id
        return TaskInput(self.task_type, task.run.run_id, fab.content, message, context)

    def _pull_message_tree(self) -> PullAppMessagesResponse:
        deadline = time.monotonic() + MESSAGE_ARRIVAL_SECONDS
        while not (pulled := self._client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() >= deadline:
                raise RuntimeError("the SuperNode made a task but stored no message for it")
            time.sleep(0.1)
        return pulled

    def reply(self, reply: Message, context: Context, failure: str | None = None) -> None:
        """Send `reply`, then close the task: completed, or failed with `failure` as its detail
        (the context, the run's state across rounds, is kept only from a completed task)."""
        push_message(self._client, reply, context)
        push_task_output(
            self._client,
            context if failure is None else None,
            SubStatus.FAILED if failure else SubStatus.COMPLETED,
            failure or "",
        )

    def fail(self, details: str) -> None:
        """Close the task as failed without a reply (its input could not even be read)."""
        push_task_output(self._client, None, SubStatus.FAILED, details)

    def __enter__(self) -> ClaimedTask:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._heartbeat.join(timeout=5)
        self._client.close()


class RuntimeApi:
    """The SuperNode's Runtime API on loopback. Claiming a task is signed with the secret shared
    with the SuperNode at start, so no other local process can take this site's messages."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.address = address
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name=COMPONENT),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                ),
            ],
        )  # fmt: skip

    def claim(self) -> ClaimedTask | None:
        """The oldest pending task, or None. Both kinds a SuperNode makes of a message are claimed
        (an AgentApp run is then refused), so that none waits unanswered and blocks the site."""
        response = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=MESSAGE_TASKS))
        if not response.HasField("task") or not response.token:
            return None
        return ClaimedTask(self.address, response.token, response.task.type)

    def close(self) -> None:
        self._client.close()
