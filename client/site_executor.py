"""The site executor: the one long-lived process that answers a site's Flower messages, always with
the ClientApp installed on this machine.

`confide join` starts it next to `flower-supernode --isolation process`. Flower's own executor
would install the app package the coordinator sent and run *its* code in a fresh process per
message; this one claims each task from the SuperNode's loopback Runtime API, compares the run's
package with the installed Confide (`client.pinned_app`: file by file, read as bytes, never
executed) and then either runs the installed `client.app:app` in this process or replies with the
refusal, which the coordinator records as the site's failed reply. Run as
`python -I -m client.site_executor`: `-I` keeps the working directory and PYTHONPATH off the
import path, so no other `client` package can stand in for the installed one. Staying alive also
spares every message a Python start and a torch import (BENCHMARKS.md, "Pinned site executor").
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message

from client.flower_runtime import (
    APP_RAISED,
    CLIENT_APP_TASK,
    REFUSED_APP,
    ClaimedTask,
    MessageExpired,
    RuntimeApi,
    RuntimeUnavailable,
    TaskInput,
)
from client.local_data import NAME_KEY
from client.pinned_app import AppFiles, installed_app, refusal

log = logging.getLogger("confide.site_executor")

POLL_SECONDS = 0.2  # an idle claim is one loopback HTTP call
UNAVAILABLE_RETRY_SECONDS = 1.0
ClientApp = Callable[[Message, Context], Message]


class Verdicts:
    """The installed app and the verdict on each package seen (a run's package does not change)."""

    def __init__(self, installed: AppFiles) -> None:
        self.installed = installed
        self._by_hash: dict[str, str | None] = {}

    def refusal(self, package: bytes) -> str | None:
        key = hashlib.sha256(package).hexdigest()
        if key not in self._by_hash:
            self._by_hash[key] = refusal(package, self.installed)
        return self._by_hash[key]


def answer(task: ClaimedTask, app: ClientApp, verdicts: Verdicts) -> None:
    """Pull one task's input, then run the installed app on it or refuse; always closes the task."""
    try:
        given = task.pull_input()
    except MessageExpired as error:
        log.warning("%s", error)
        task.fail(str(error))
        return
    except Exception as error:  # the run may have ended meanwhile
        log.warning("could not read a task's input (%s); skipped", error)
        task.fail(f"the site could not read the task's input: {error}")
        return
    reason = (
        verdicts.refusal(given.package)
        if given.task_type == CLIENT_APP_TASK
        else f"refused: this site runs only its installed ClientApp, not a {given.task_type} task"
    )
    if reason is not None:
        log.error("run %s: %s", given.run_id, reason)
        site = given.context.node_config.get(NAME_KEY)  # the coordinator's record names the site
        told = f"{site}: {reason}" if site else reason
        reply = Message(Error(code=REFUSED_APP, reason=told), reply_to=given.message)
        task.reply(reply, given.context, failure=told)
        return
    reply, failure = run_installed_app(app, given)
    task.reply(reply, given.context, failure=failure)


def run_installed_app(app: ClientApp, given: TaskInput) -> tuple[Message, str | None]:
    """The installed ClientApp on one message; an exception becomes an error reply, as Flower's
    own `flwr-clientapp` makes it, and this process stays up for the next message."""
    kind = given.message.metadata.message_type
    started = time.perf_counter()
    try:
        reply = app(given.message, given.context)
    except Exception as error:  # the coordinator hears of it
        log.exception("run %s: the ClientApp raised on a %s message", given.run_id, kind)
        reason = f"{type(error).__name__}: {error}"
        return Message(Error(code=APP_RAISED, reason=reason), reply_to=given.message), reason
    log.info(
        "run %s: %s message answered in %.2f s", given.run_id, kind, time.perf_counter() - started
    )
    return reply, None


def serve(api: RuntimeApi, app: ClientApp, verdicts: Verdicts) -> None:
    """Claim and answer tasks one at a time (the SuperNode hands out one message at a time)."""
    waiting_since: float | None = None
    while True:
        try:
            task = api.claim()
        except RuntimeUnavailable as error:
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("waiting for the SuperNode's Runtime API at %s (%s)", api.address, error)
            time.sleep(UNAVAILABLE_RETRY_SECONDS)
            continue
        if waiting_since is not None:
            log.info("connected to the SuperNode's Runtime API at %s", api.address)
            waiting_since = None
        if task is None:
            time.sleep(POLL_SECONDS)
            continue
        with task:
            try:
                answer(task, app, verdicts)
            except RuntimeUnavailable as error:
                log.error("lost the SuperNode while answering a task: %s", error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's API")
    parser.add_argument("--secret-file", type=Path, required=True, help="shared with the SuperNode")
    args = parser.parse_args(argv)
    logging.basicConfig(  # force: an imported library may have set up the root logger already
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per loopback call otherwise
    # SIGTERM (`confide join` stopping) unwinds like Ctrl-C: connections close, nothing lingers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    secret = args.secret_file.read_bytes()
    # The installed app, imported once: torch loads here, not once per message.
    from client.app import app

    installed = installed_app()
    log.info(
        "serving the installed ClientApp (app sha256 %s, %d files) for the SuperNode at %s",
        installed.digest[:12], len(installed.files), args.runtime_api,
    )  # fmt: skip
    api = RuntimeApi(args.runtime_api, secret)
    try:
        serve(api, app, Verdicts(installed))
    finally:
        api.close()


if __name__ == "__main__":
    main()
