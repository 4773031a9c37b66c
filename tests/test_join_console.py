"""`confide join`'s console shows each refusal the site executor logs, one line naming the policy
field, while join supervises the site: real processes writing a real log file, no network."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from client.join import EXECUTOR_LOG, LogFollower, Site, supervise
from common.processes import ManagedProcess
from confide.deploy_cli import show_refusal

# The lines as the executor logs them (client/site_executor.py `main`, client/app.py `_refusal`).
POLICY_REASON = (
    "refused by site policy (policy.toml [sites.cleveland]): require-dp = true, but the run asks "
    "dp = false"
)
APP_REFUSAL = f"2025-06-01 10:00:00,123 WARNING client.app: cleveland refuses: {POLICY_REASON}\n"
PACKAGE_REASON = "refused: the run's app package (sha256 0123abcd) is not the app installed here"
EXECUTOR_REFUSAL = (
    f"2025-06-01 10:00:01,456 ERROR confide.site_executor: run 42: {PACKAGE_REASON}\n"
)
INFO = "2025-06-01 10:00:02,789 INFO confide.site_executor: run 42: train message answered\n"
# Writes each argument to its log, a poll (0.5 s) apart, then exits as a stopping executor would.
WRITER = """
import sys, time
for piece in sys.argv[1:]:
    print(piece, end="", flush=True)
    time.sleep(0.6)
"""


def supervised_console(tmp_path: Path, capsys: pytest.CaptureFixture[str], *pieces: str) -> str:
    """What join's console shows while the site's executor writes `pieces` to its log."""
    log = tmp_path / EXECUTOR_LOG
    executor_log = LogFollower(log)  # as join follows it: from before the executor starts
    executor = ManagedProcess("executor", [sys.executable, "-c", WRITER, *pieces], log)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    site = Site(ManagedProcess("supernode", sleeper, tmp_path / "supernode.log"), executor,
                executor_log)  # fmt: skip
    assert supervise(site, lambda: False, lambda _: None, show_refusal) == 0
    assert not site.supernode.alive()
    return capsys.readouterr().out


def test_join_shows_each_refusal_naming_its_policy_field(tmp_path, capsys):
    shown = supervised_console(tmp_path, capsys, APP_REFUSAL, INFO, EXECUTOR_REFUSAL)
    assert shown.splitlines() == [f"refusal: {POLICY_REASON}", f"refusal: {PACKAGE_REASON}"]


def test_join_shows_a_refusal_written_in_pieces_once_whole(tmp_path, capsys):
    half = len(APP_REFUSAL) // 2
    shown = supervised_console(tmp_path, capsys, APP_REFUSAL[:half], APP_REFUSAL[half:])
    assert shown.splitlines() == [f"refusal: {POLICY_REASON}"]


def test_join_does_not_repeat_refusals_of_an_earlier_start(tmp_path, capsys):
    (tmp_path / EXECUTOR_LOG).write_text(APP_REFUSAL)
    assert supervised_console(tmp_path, capsys, INFO) == ""
