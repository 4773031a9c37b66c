"""`flower-superlink`, with a SQLite lock wait that survives a busy coordinator.

Flower 1.42 opens its SQLite state with `PRAGMA busy_timeout = 5000` (hard-coded in
`flwr.supercore.constant.SQLITE_PRAGMAS`, applied by `flwr.supercore.sql_mixin`). When many sites
push at once on a loaded machine, a write can wait longer than 5 s for the lock; the SuperLink then
answers HTTP 500 ("database is locked"), and Flower does not retry: the site's reply is lost and the
round waits for it until `round-timeout`. Seen here with 10 sites on 2 busy cores. We run the
unmodified SuperLink with a longer wait; everything else, including its command line, is Flower's.
"""

from __future__ import annotations

import sys

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


def main() -> None:
    longer_lock_wait()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
