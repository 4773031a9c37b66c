"""Memory and CPU of a whole process tree (a `confide simulate` and every Ray process it starts).

`ru_maxrss` of a child covers one process; a simulation is a driver plus Ray's GCS, raylet, dashboard,
log monitor and one worker per actor. `TreeSampler` reads `/proc` every `interval` seconds and sums
over the root, all its descendants, every process in the root's session (start the root with
`start_new_session=True`: Ray daemons that re-parent to init stay counted) and every process seen
before that is still alive.

Per sample it records the summed RSS (what `ps` shows; shared pages such as Ray's object store or
torch's libraries count once per process) and the summed PSS (shared pages divided among their
users: what the tree really costs the machine; read every 3 s only, it is expensive), and CPU seconds (user + system) of the tree, kept
for processes that have already exited. It also reads machine-wide CPU from `/proc/stat`, so a
report can say how busy the rest of this shared machine was.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float  # time.time()
    rss: int  # bytes, summed over the tree
    pss: int  # bytes, summed over the tree; only every `pss_every`-th sample, else 0
    procs: int
    cpu: float  # tree CPU seconds so far (user + system), exited processes included
    machine_busy: float  # machine CPU seconds (all processes) so far, from /proc/stat


@dataclass
class TreeStats:
    samples: list[Sample] = field(default_factory=list)
    peak_breakdown: list[tuple[int, str, int]] = field(default_factory=list)  # pid, name, rss

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    @property
    def peak_pss(self) -> int:
        return max((s.pss for s in self.samples), default=0)

    @property
    def peak_procs(self) -> int:
        return max((s.procs for s in self.samples), default=0)

    def at(self, t: float) -> Sample | None:
        """The last sample taken at or before `t` (None if none)."""
        best = None
        for sample in self.samples:
            if sample.t <= t:
                best = sample
            else:
                break
        return best

    def cpu_between(self, start: float, end: float) -> tuple[float, float] | None:
        """(tree CPU seconds, machine busy CPU seconds) between two times, from samples."""
        a, b = self.at(start), self.at(end)
        if a is None or b is None or b.t <= a.t:
            return None
        return b.cpu - a.cpu, b.machine_busy - a.machine_busy


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, session id, CPU seconds) from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid, session = int(fields[1]), int(fields[3])
    utime, stime = int(fields[11]), int(fields[12])
    return ppid, session, (utime + stime) / TICKS


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"
    return cmd[:90]


def _machine_busy() -> float:
    """CPU seconds spent by all CPUs in anything but idle/iowait since boot."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICKS


class TreeSampler:
    """Use as a context manager around a running `subprocess.Popen`."""

    def __init__(
        self,
        root_pid: int,
        interval: float = 0.2,
        on_sample: Callable[[float], None] | None = None,
        pss_every: int = 15,
    ) -> None:
        self.root = root_pid
        self.interval = interval
        # Reading smaps_rollup walks page tables: ~10 ms per 500 MB process, so PSS is read
        # every `pss_every` samples only (RSS is cheap and read every time).
        self.pss_every = pss_every
        self._count = 0
        self.on_sample = on_sample  # called with the sample time, e.g. to watch a metrics file
        self.stats = TreeStats()
        self._known: set[int] = set()
        self._cpu_last: dict[int, float] = {}  # last CPU seconds seen per pid (exited ones kept)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def members(self) -> list[int]:
        table: dict[int, tuple[int, int, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _stat(int(entry))
                if stat is not None:
                    table[int(entry)] = stat
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in tree:
                tree.add(pid)
                todo.extend(children.get(pid, []))
        tree |= {pid for pid, (_, session, _) in table.items() if session == self.root}
        tree |= {pid for pid in self._known if pid in table}
        self._known |= tree
        for pid in tree:
            self._cpu_last[pid] = table[pid][2]
        return sorted(tree)

    def sample(self) -> Sample:
        pids = self.members()
        rss = {pid: _rss(pid) for pid in pids}
        total = sum(rss.values())
        read_pss = self._count % self.pss_every == 0
        self._count += 1
        sample = Sample(
            t=time.time(),
            rss=total,
            pss=sum(_pss(pid) for pid in pids) if read_pss else 0,
            procs=len(pids),
            cpu=sum(self._cpu_last.values()),
            machine_busy=_machine_busy(),
        )
        if total > self.stats.peak_rss:
            self.stats.peak_breakdown = sorted(
                ((pid, _name(pid), value) for pid, value in rss.items()),
                key=lambda item: -item[2],
            )
        self.stats.samples.append(sample)
        return sample

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            sample = self.sample()
            if self.on_sample is not None:
                self.on_sample(sample.t)
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - started)))
        self.sample()


def kill_tree(sampler: TreeSampler) -> None:
    """SIGKILL what is left of the tree this sampler followed (its own processes only)."""
    import signal

    for pid in sampler.members():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
