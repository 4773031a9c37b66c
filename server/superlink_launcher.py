"""`flower-superlink`, with a SQLite lock wait that survives a busy coordinator.

Flower 1.42 opens its SQLite state with `PRAGMA busy_timeout = 5000` (hard-coded in
`flwr.supercore.constant.SQLITE_PRAGMAS`, applied by `flwr.supercore.sql_mixin`). When many sites
push at once on a loaded machine, a write can wait longer than 5 s for the lock; the SuperLink then
answers HTTP 500 ("database is locked"), and Flower does not retry: the site's reply is lost and the
round waits for it until `round-timeout`. Seen here with 10 sites on 2 busy cores. We run the
unmodified SuperLink with a longer wait; everything else, including its command line, is Flower's.

Two more additions, both outside Flower's code: the HTTP app is wrapped in `OperatorOnly`
(server/operator_credential.py: the Control API answers only the operator), and its log lines carry
timestamps and no colour codes when they go to a file, as ops tools expect.
"""

from __future__ import annotations

import sys
from typing import Any

from server.operator_credential import OperatorOnly, credential_from_environment

BUSY_TIMEOUT_MS = 60_000


def longer_lock_wait() -> None:
    """Raise the busy_timeout pragma Flower applies to every new SQLite connection."""
    from flwr.supercore import sql_mixin

    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no busy_timeout entry")
    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[assignment]
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in pragmas
    )


def operator_only_http() -> None:
    """Wrap the app `flower-superlink` hands to uvicorn, so no Control call passes unproven."""
    import uvicorn

    credential = credential_from_environment()
    run = uvicorn.run

    def guarded_run(app: Any, *args: Any, **kwargs: Any) -> None:
        run(OperatorOnly(app, credential), *args, **kwargs)

    uvicorn.run = guarded_run


def plain_logs() -> None:
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=sys.stderr.isatty())


def main() -> None:
    longer_lock_wait()
    operator_only_http()
    plain_logs()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
