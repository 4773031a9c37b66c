"""Faults injected into a real federation on 127.0.0.1: a site and the coordinator are `kill -9`ed
mid-run. The run finishes, the site rejoins, and no complete round is lost.

One TLS coordinator and two sites (tests/deployment_fixtures.py) serve the module; every process is
stopped at the end, and the last check is that none is left. Runs are short (heart, a few rounds,
one local epoch) and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.run_config import RunConfig
from server.coordinator import flwr_control
from server.coordinator.coordinator import CoordinatorError, StateLayout
from server.coordinator.coordinator_run import RunRequest, connect, run_config_for
from server.run_record import read_metrics
from tests.deployment_fixtures import (
    Background,
    Federation,
    confide,
    running_federation,
    wait_for,
)

# A site that stops answering costs a round this long, and a message lives this long: a site
# reconnecting after the coordinator's restart (Flower backs off up to 20 s between tries) must
# still find the resumed round's message alive, on 2 busy cores.
ROUND_TIMEOUT = 60
RUN_TIMEOUT = 600
# The killed site misses a round or two while it rejoins (Flower first sees it offline, then
# `confide join` imports torch): the rounds after that leave it time to, on 2 busy cores too.
SITE_FAULT_ROUNDS = 6
SETTINGS = ["--set", "local-epochs=1", "--set", f"round-timeout={ROUND_TIMEOUT}",
            "--set", "min-train-replies=1", "--set", "round-retries=1"]  # fmt: skip


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    with running_federation(tmp_path_factory.mktemp("faults")) as fed:
        yield fed


def kill_tree(pid: int) -> None:
    """`kill -9` a process and every descendant at once, as a power cut or the OOM killer would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending += children.get(tree[-1], [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def start_run(fed: Federation, out: Path, rounds: int) -> Background:
    args = ["coordinator", "run", "--state", str(fed.state), "--rounds", str(rounds),
            "--out", str(out), "--quiet", "--wait-timeout", "120", *SETTINGS]  # fmt: skip
    return Background(args, fed.root / f"run-{out.name}.log")


def complete_rounds(out: Path) -> list[dict]:
    return (read_metrics(out) or {}).get("rounds", [])


def train_messages_received(fed: Federation, name: str) -> int:
    log = fed.root / "nodes" / name / "supernode.log"
    return log.read_text(errors="replace").count("Receiving: train message") if log.exists() else 0


def online(fed: Federation, name: str) -> bool:
    node = json.loads(StateLayout(fed.state).registered.read_text())[name]["node_id"]
    connection, _ = connect(fed.state)
    nodes = flwr_control.list_nodes(connection)
    return any(str(n["node-id"]) == str(node) and n["status"] == "online" for n in nodes)


def trained(entry: dict, name: str) -> bool:
    return any(c["name"] == name and "train_examples" in c for c in entry["clients"])


@pytest.mark.slow
def test_a_site_killed_mid_round_the_run_finishes_and_the_site_rejoins(federation):
    fed, out = federation, federation.root / "site-fault"
    run = start_run(fed, out, rounds=SITE_FAULT_ROUNDS)
    try:
        wait_for(lambda: len(complete_rounds(out)) >= 1 or not run.alive(), RUN_TIMEOUT, "round 1")
        killed_after = len(complete_rounds(out))
        assert run.alive() and killed_after < SITE_FAULT_ROUNDS, run.output()[-3000:]
        received = train_messages_received(fed, "bank-1")
        wait_for(lambda: train_messages_received(fed, "bank-1") > received, RUN_TIMEOUT,
                 "bank-1 to receive the next round's training")  # fmt: skip
        kill_tree(fed.sites["bank-1"].popen.pid)  # mid-round: its update is being computed
        # Flower refuses the same key while the dead node still counts as online (two missed
        # heartbeats, up to 60 s); `confide join` says so, and an operator joins again then.
        wait_for(lambda: not online(fed, "bank-1"), RUN_TIMEOUT, "the coordinator to see bank-1 go")
        fed.start_site("bank-1")
        assert run.wait(timeout=RUN_TIMEOUT) == 0, run.output()[-3000:]
    finally:
        run.stop()
    metrics = read_metrics(out) or {}
    assert metrics["status"] == "completed"
    rounds = metrics["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(1, SITE_FAULT_ROUNDS + 1))
    assert all(trained(entry, "hospital-1") for entry in rounds)  # the survivor never stopped
    missed = [e["round"] for e in rounds[killed_after:] if not trained(e, "bank-1")]
    assert missed, "bank-1 was killed but trained in every round"
    assert any(trained(e, "bank-1") for e in rounds if e["round"] > missed[-1]), (
        f"bank-1 did not rejoin after round {missed[-1]}"
    )


@pytest.mark.slow
def test_a_coordinator_killed_mid_run_resumes_without_losing_a_round(federation):
    fed, out = federation, federation.root / "coordinator-fault"
    run = start_run(fed, out, rounds=2)
    try:
        wait_for(lambda: len(complete_rounds(out)) >= 1 or not run.alive(), RUN_TIMEOUT, "round 1")
        assert fed.coordinator is not None and run.alive(), run.output()[-3000:]
        kill_tree(fed.coordinator.popen.pid)  # SuperLink, ServerApp, nginx: all at once
        before_crash = read_metrics(out) or {}
        assert before_crash["status"] == "running" and len(before_crash["rounds"]) < 2
        assert run.wait(timeout=120) != 0  # the client of the control API saw it go
    finally:
        run.stop()
    fed.start_coordinator()  # the same state directory: SuperLink's database, keys, port
    resumed = confide("coordinator", "run", "--state", str(fed.state), "--resume", str(out),
                      "--quiet", "--wait-timeout", "180", timeout=RUN_TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    metrics = read_metrics(out) or {}
    assert metrics["status"] == "completed"
    assert [entry["round"] for entry in metrics["rounds"]] == [1, 2]
    complete_at_crash = len(before_crash["rounds"])
    assert metrics["resumed_after_rounds"] == [complete_at_crash]  # 0 complete rounds lost
    assert metrics["rounds"][:complete_at_crash] == before_crash["rounds"]  # kept as recorded
    assert metrics["initial"] == before_crash["initial"]
    # Each site answers the resumed round: a message the killed coordinator left behind expires
    # at the site instead of holding it (tests/test_site_executor.py).
    resumed_round = metrics["rounds"][-1]
    assert all(trained(resumed_round, name) for name in fed.sites), resumed_round


def test_resume_continues_with_the_settings_the_run_started_with(tmp_path):
    config = RunConfig.from_mapping({"num-server-rounds": 4, "local-epochs": 1})
    document = {"config": config.to_mapping(), "rounds": [{"round": 1}], "status": "running"}
    (tmp_path / "metrics.json").write_text(json.dumps(document))
    request = RunRequest(state=tmp_path, out=tmp_path, overrides={"seed": 3}, resume=True)
    resumed = run_config_for(request, expected_clients=2)
    assert (resumed.num_server_rounds, resumed.local_epochs, resumed.seed) == (4, 1, 3)
    assert resumed.resume and resumed.run_dir == str(tmp_path.resolve())


def test_resume_needs_a_run_directory_with_a_complete_round(tmp_path):
    (tmp_path / "metrics.json").write_text('{"rounds": [], "status": "failed"}')
    with pytest.raises(CoordinatorError, match="no complete round to resume from"):
        run_config_for(RunRequest(state=tmp_path, out=tmp_path, resume=True), expected_clients=2)


def test_out_and_resume_are_one_or_the_other(tmp_path):
    result = confide("coordinator", "run", "--state", str(tmp_path), "--quiet")
    assert result.returncode == 2
    assert "pass either --out DIR for a new run or --resume DIR" in result.stderr
    assert not list(tmp_path.iterdir())
