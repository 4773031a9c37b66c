"""Only the operator reaches the SuperLink's Control API, even from the coordinator machine itself.

Flower 1.42's open-source SuperLink serves its Control API (register and unregister nodes, start,
stop and list runs, read run configs) on the same loopback port nginx forwards the Fleet API to,
and authenticates no Control caller: any local user could run `flwr ls` against it. So the
coordinator makes a random credential at start, in its state directory, readable by the service
user only (0600 in a 0700 directory); the SuperLink, started through
`superlink_launcher.py`, answers 403 to every Control API request without it, and
`confide coordinator` sends it through `operator_cli.py`, Flower's own `flwr` CLI with one
extra header. Proof of being the operator = being able to read that file. nginx never forwards
`/v1/control/`, so the credential never travels beyond loopback.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically

HEADER = "x-confide-operator"
TOKEN_FILE_ENV = "CONFIDE_OPERATOR_CREDENTIAL"
CONTROL_PREFIX = "/v1/control/"
# Flower's interactive API pages describe the Control API too; the operator has no need of them.
CLOSED_PATHS = ("/docs", "/redoc", "/openapi.json")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_credential(path: Path) -> str:
    """A fresh credential for this start (0600 from its first byte); the old one stops working."""
    token = secrets.token_urlsafe(32)
    write_atomically(path, token.encode() + b"\n", 0o600)
    return token


def read_credential(path: Path) -> str:
    return path.read_text().strip()


class OperatorOnly:
    """ASGI middleware: Control API requests without the operator credential get 403."""

    def __init__(self, app: ASGIApp, credential: str) -> None:
        self.app = app
        self.credential = credential.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        guarded = path.startswith(CONTROL_PREFIX) or path in CLOSED_PATHS
        if scope.get("type") == "http" and guarded and not self._has_credential(scope):
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": b"the Control API is for the coordinator's operator only\n",
                }
            )
            return
        await self.app(scope, receive, send)

    def _has_credential(self, scope: Scope) -> bool:
        presented = next(
            (value for name, value in scope.get("headers", ()) if name == HEADER.encode()), b""
        )
        return hmac.compare_digest(presented, self.credential)


def credential_from_environment() -> str:
    """The credential file named by the coordinator in the SuperLink's environment."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise RuntimeError(f"{TOKEN_FILE_ENV} is not set; start the SuperLink through Confide")
    return read_credential(Path(path))
