"""What a deployed site spends per message beyond training: Flower's fresh process per message vs
Confide's long-lived pinned site executor.

    .venv/bin/python -m bench.message_overhead               # 2 sites, 3 rounds, both modes
    .venv/bin/python -m bench.message_overhead --rounds 5 --repeats 2

Both modes run the real deployment on 127.0.0.1 (TLS `confide coordinator` behind nginx, sites
started as `confide join` starts them, heart, DP-SGD, 1 local epoch), one fresh coordinator per
mode and repeat, modes alternating. "flower" is the site before the pinned executor:
`flower-supernode` in Flower's default subprocess isolation, which starts `flwr-clientapp` (a new
Python, torch imported, the package installed) for every message. "pinned" is today's `confide join`: `--isolation process` plus
`client/site_executor.py`. A message's wall time is the SuperNode's own view, from its
"Receiving: ... message" log line to its "Sent successfully" (lines timestamped as they appear,
polled every 20 ms). Compute = the ClientApp's own time for the message, measured in-process by
the pinned executor (the same code on the same data and model in both modes; Flower's process
reports none); overhead = median wall - median compute, per message kind, over every message of
every site (the machine is noisy).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import setup_line, write_section
from bench.transport import write_sites
from client.join import (
    EXECUTOR_LOG,
    JoinSettings,
    Site,
    prepare_join,
    start_supernode,
    write_site_policy,
)
from common.certificates.issuing import init_certs
from common.processes import ManagedProcess, free_port
from server.coordinator.coordinator import StartSettings, start_coordinator
from server.coordinator.coordinator_run import RunRequest, submit_run, wait_for_run

MODES = ("flower", "pinned")
GOAL_SECONDS = 2.0
RUN_TIMEOUT = 1800.0
RECEIVING = re.compile(r"Receiving: (\w+) message")
ANSWERED = re.compile(r": (\w+) message answered in ([0-9.]+) s")
SENT = "Sent successfully"
RUN_SETTINGS = {"local-epochs": 1, "dp": True}  # a site's default policy requires DP-SGD
PINNED_ONLY = ("--isolation", "--superexec-auth-secret-file")  # options taking one value each


@dataclass
class LogClock:
    """Timestamps the SuperNode's log lines as they appear (Flower's log has no time of day)."""

    path: Path
    messages: list[tuple[str, float, float]] = field(default_factory=list)  # kind, received, sent
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        offset, pending, receiving = 0, "", None
        while not self._stop.is_set():
            try:
                with self.path.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
            except OSError:
                chunk = b""
            now = time.monotonic()
            offset += len(chunk)
            pending += chunk.decode(errors="replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                if found := RECEIVING.search(line):
                    receiving = (found.group(1), now)
                elif SENT in line and receiving is not None:
                    self.messages.append((receiving[0], receiving[1], now))
                    receiving = None
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_site(settings: JoinSettings, mode: str) -> Site | ManagedProcess:
    """`confide join`'s processes ("pinned"), or the SuperNode alone in Flower's default mode."""
    plan = prepare_join(settings)
    if mode == "pinned":
        return start_supernode(plan, settings.name)
    argv, skip = [], 0
    for item in plan.argv:
        if skip or item in PINNED_ONLY:
            skip = 0 if skip else 1
            continue
        argv.append(item)
    write_site_policy(plan)
    return ManagedProcess(f"flower-supernode ({settings.name})", argv,
                          plan.work_dir / "supernode.log", env=plan.env)  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    mode: str
    wall: dict[str, list[float]]  # message kind -> the SuperNode's wall time per message
    compute: dict[str, list[float]]  # kind -> the ClientApp's own time (pinned mode only)


def measure(mode: str, sites: int, rounds: int, root: Path) -> Measurement:
    names = [f"site-{index + 1}" for index in range(sites)]
    certs = init_certs(root / "certs", ["127.0.0.1"], names)
    files = write_sites(root, sites)
    coordinator = start_coordinator(
        StartSettings(certs.root, root / "state", "127.0.0.1", free_port(), False)
    )
    processes: list[Site | ManagedProcess] = []
    clocks: dict[str, LogClock] = {}
    try:
        for name, data in zip(names, files, strict=True):
            settings = JoinSettings(
                role="hospital", data=data, task="heart", coordinator=coordinator.public_address,
                ca=certs.ca_cert, key=certs.client_private_key(name), name=name,
                ledger=root / "ledgers" / f"{name}.json", work_dir=root / "nodes" / name,
            )  # fmt: skip
            processes.append(start_site(settings, mode))
            clocks[name] = LogClock(root / "nodes" / name / "supernode.log")
        submitted = submit_run(RunRequest(
            state=root / "state", out=root / "run", rounds=rounds, overrides=RUN_SETTINGS,
            clients=sites, wait_timeout=600,
        ))  # fmt: skip
        wait_for_run(submitted, RUN_TIMEOUT)
    finally:
        for clock in clocks.values():
            clock.stop()
        for process in reversed(processes):
            process.stop()
        coordinator.stop()
    wall: dict[str, list[float]] = {}
    for clock in clocks.values():
        for kind, received, sent in clock.messages:
            wall.setdefault(kind, []).append(sent - received)
    compute: dict[str, list[float]] = {}
    for name in names:
        log = root / "nodes" / name / EXECUTOR_LOG
        for kind, seconds in ANSWERED.findall(log.read_text() if log.exists() else ""):
            compute.setdefault(kind, []).append(float(seconds))
    return Measurement(mode, wall, compute)


def pooled(results: list[Measurement], mode: str, part: str) -> dict[str, list[float]]:
    merged: dict[str, list[float]] = {}
    for m in results:
        if m.mode == mode:
            for kind, values in getattr(m, part).items():
                merged.setdefault(kind, []).extend(values)
    return merged


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: list[Measurement], command: str, load: tuple[float, float]) -> str:
    compute = pooled(results, "pinned", "compute")
    lines = [
        "## Pinned site executor: overhead per message",
        "",
        f"`{command}` on {setup_line()}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (a shared machine: medians).",
        "",
        (__doc__ or "").split("\n\n", 2)[2].replace("\n", " ").strip(),
        "",
        "| mode | message | messages | wall, s (min-max) | compute, s | overhead, s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    overheads: dict[tuple[str, str], float] = {}
    for mode in MODES:
        for kind, walls in sorted(pooled(results, mode, "wall").items(), reverse=True):
            work = median(compute.get(kind, []))
            overheads[(mode, kind)] = median(walls) - work
            lines.append(
                f"| {mode} | {kind} | {len(walls)} | {median(walls):.2f} "
                f"({min(walls):.2f}-{max(walls):.2f}) | {work:.2f} | "
                f"{overheads[(mode, kind)]:.2f} |"
            )
    for kind in ("train", "evaluate"):
        before, after = overheads.get(("flower", kind)), overheads.get(("pinned", kind))
        if before is not None and after is not None:
            met = "met" if after < GOAL_SECONDS else "**missed**"
            lines += [
                "",
                f"{kind}: overhead flower / pinned = **{before / after:.1f}x** "
                f"({before:.2f} s -> {after:.2f} s); goal < {GOAL_SECONDS:.0f} s per message: {met}.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    # `timeout`, CI and kill send SIGTERM: unwind through the finally blocks that stop processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, modes alternating")
    parser.add_argument("--keep", type=Path, help="work here and keep logs (default: a temp dir)")
    args = parser.parse_args()
    options = (("sites", args.sites, 2), ("rounds", args.rounds, 3), ("repeats", args.repeats, 1))
    command = "python -m bench.message_overhead" + "".join(
        f" --{name} {value}" for name, value, default in options if value != default
    )
    load_start = os.getloadavg()[0]
    results: list[Measurement] = []
    for repeat in range(args.repeats):
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix=f"confide-bench-{mode}-") as scratch:
                root = args.keep.resolve() / f"{mode}-{repeat + 1}" if args.keep else Path(scratch)
                results.append(measure(mode, args.sites, args.rounds, root))
            walls = {kind: round(median(v), 2) for kind, v in results[-1].wall.items()}
            print(f"{mode:6} repeat {repeat + 1}: median wall per message {walls}", flush=True)
            write_section("message-overhead", report(results, command,
                                                     (load_start, os.getloadavg()[0])))  # fmt: skip
    print("wrote bench/results/message-overhead.md")


if __name__ == "__main__":
    main()
