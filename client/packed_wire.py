"""The ClientApp's side of the packed model (common/packed_arrays.py), as a Flower mod.

A packed request is unpacked against the site's own model before the app sees it, and the reply's
model is packed the same way; a request that came unpacked (SecAgg+, whose masks work on named
arrays, or an older coordinator) is answered unpacked. Inner mods and the app see named arrays.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.site_inputs import ReceivedInputError, site_run_config
from common.federated_model import federated_layout
from common.hf_model import HFModelError
from common.packed_arrays import Slot, is_packed, layout_of, pack, unpack
from common.run_config import RunConfig, RunConfigError
from common.tasks import task_schema


@lru_cache(maxsize=2)
def model_layout(config: RunConfig) -> tuple[Slot, ...]:
    return layout_of(ArrayRecord(federated_layout(task_schema(config), config)))


def packed_model(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    records = msg.content.array_records if msg.has_content() else {}
    packed_keys = [key for key, record in records.items() if is_packed(record)]
    if packed_keys:
        try:
            layout = model_layout(site_run_config(context))
        except (HFModelError, ReceivedInputError, RunConfigError):  # the app refuses, saying why
            return call_next(msg, context)
        for key in packed_keys:
            msg.content[key] = unpack(records[key], layout)
    reply = call_next(msg, context)
    if packed_keys and reply.has_content():
        for key, record in reply.content.array_records.items():
            reply.content[key] = pack(record)
    return reply
