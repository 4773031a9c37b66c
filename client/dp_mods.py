"""Client-side clipping for client-level DP, switched on by the run config.

Flower's `fixedclipping_mod` and `adaptiveclipping_mod` answer every train message without a
clipping norm with an error, so they cannot be attached unconditionally; this mod hands a message
to the one the run asks for and leaves every other run alone. It is attached to the train handler
only: an app-wide mod would also wrap evaluate, whose messages carry no norm.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

CLIPPING_MODS = {"client": fixedclipping_mod, "adaptive": adaptiveclipping_mod}


def client_side_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    mod = CLIPPING_MODS.get(str(context.run_config.get("client-dp-clipping", "server")))
    if not context.run_config.get("client-dp") or mod is None:
        return call_next(msg, context)
    return mod(msg, context, call_next)
