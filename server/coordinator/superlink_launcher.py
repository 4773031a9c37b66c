"""`flower-superlink`, with a SQLite lock wait that survives a busy coordinator.

Flower 1.42 opens its SQLite state with `PRAGMA busy_timeout = 5000` (hard-coded in
`flwr.supercore.constant.SQLITE_PRAGMAS`, applied by `flwr.supercore.sql_mixin`). When many sites
push at once on a loaded machine, a write can wait longer than 5 s for the lock; the SuperLink then
answers HTTP 500 ("database is locked"), and Flower does not retry: the site's reply is lost and the
round waits for it until `round-timeout`. Seen here with 10 sites on 2 busy cores. We run the
unmodified SuperLink with a longer wait; everything else, including its command line, is Flower's.

Two more additions, both outside Flower's code: the HTTP app is wrapped in `OperatorOnly`
(operator_credential.py: the Control API answers only the operator), and its log lines carry
timestamps and no colour codes when they go to a file, as ops tools expect. The two hooks into
Flower (the pragma, the HTTP app) are in common/flower_compat.py.
"""

from __future__ import annotations

import sys

from common.flower_compat import (
    plain_console_logs,
    set_sqlite_busy_timeout,
    wrap_superlink_http_app,
)
from server.coordinator.operator_credential import OperatorOnly, credential_from_environment

BUSY_TIMEOUT_MS = 60_000


def main() -> None:
    set_sqlite_busy_timeout(BUSY_TIMEOUT_MS)
    credential = credential_from_environment()
    wrap_superlink_http_app(lambda app: OperatorOnly(app, credential))
    plain_console_logs()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
