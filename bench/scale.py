"""How Confide's simulation scales with the number of virtual clients, against a bare Flower app.

    .venv/bin/python -m bench.scale                     # the whole benchmark (about 20 minutes)
    .venv/bin/python -m bench.scale --sizes 10 --variants confide   # one cell

For each size N and variant it runs one simulation as a subprocess (its own session, so the whole
process tree, Ray included, can be followed and cleaned up) and reports, over the steady-state
rounds (round 2 on: round 1 pays for Ray's and the workers' warm-up):

- seconds per round (train + evaluate of every sampled client) and client-rounds per second;
- efficiency = the clients' own training seconds summed / (round wall seconds x cores used);
- peak RSS of the whole process tree (summed over processes: shared pages count once per process)
  and peak PSS (shared pages divided among processes: what the tree costs the machine);
- CPU seconds of the tree per client-round, and how busy the rest of the machine was.

Variants:
- confide: `confide simulate bank ...` exactly as a user runs it.
- confide-patched: the same with the library changes proposed in `bench/patched_confide.py`
  applied by monkeypatching (the evidence for them): `dispatch` (one pass over Flower's message
  store per sweep instead of one per node) and `nice` (Ray workers at niceness 0 instead of 15).
  confide-dispatch has `dispatch` alone. Confide now does both itself (`simulations/dispatch.py`,
  `simulations/engine.py`), so these variants now run what `confide` runs; the recorded results
  compare them with Confide before that.
- baseline: `bench/baseline_app`, a quickstart-style Flower app (data read and encoded inside each
  handler call, Flower's default 2 CPUs per virtual client). It is slow, so at 100 and 1,000 clients
  it samples `--baseline-clients-per-round` clients per round (FedAvg's fraction-train/evaluate)
  and the full round is extrapolated as N / (client-rounds per second).
- baseline-cached: the baseline with the data loaded once per worker (as Flower's real quickstart
  does with its global `fds`), to separate framework overhead from data loading.
- flower-floor: the baseline app whose handlers reply at once (the received weights back, no data,
  no training), every client every round, 1 CPU per client as Confide: what Flower's simulation
  engine itself costs per client-round, the floor under any ClientApp.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.process_tree import TreeSampler, TreeStats

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
CONFIDE = str(ROOT / ".venv" / "bin" / "confide")
CORES = os.cpu_count() or 1
# bank's scenario splits with dirichlet-alpha = 1.0, which cannot give 1,000 clients 2 records each
# (PartitionError); 2.0 can, and is used at every size so the sizes stay comparable.
DIRICHLET_ALPHA = 2.0
PATCHES = {
    "confide-dispatch": "dispatch",
    "confide-patched": "dispatch,nice",
}
BARE_FLOWER = ("baseline", "baseline-cached", "flower-floor")  # bench/baseline_app variants
VARIANTS = ("confide", *PATCHES, *BARE_FLOWER)
MiB = 1024 * 1024


@dataclass
class Round:
    round: int
    seconds: float
    clients: int
    train_seconds: float
    end: float  # time.time() the round was seen finished (+- the sampling interval)


@dataclass
class RunResult:
    variant: str
    clients: int
    rounds_asked: int
    command: str
    wall: float
    status: str  # completed | timeout | failed
    rounds: list[Round] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    peak_breakdown: list[tuple[int, str, int]] = field(default_factory=list)
    steady: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _confide_command(
    variant: str, clients: int, rounds: int, out: Path, alpha: float
) -> tuple[list[str], dict]:
    args = [
        "simulate", "bank", "--clients", str(clients), "--rounds", str(rounds),
        "--set", "local-epochs=1", "--set", f"dirichlet-alpha={alpha}",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    if variant == "confide":
        return [CONFIDE, *args], {}
    return [PYTHON, "-m", "bench.patched_confide", *args], {"BENCH_PATCHES": PATCHES[variant]}


def _baseline_command(
    variant: str, clients: int, rounds: int, per_round: int, timing: Path, alpha: float
) -> list[str]:
    command = [
        PYTHON, "-m", "bench.baseline_app.run", "--clients", str(clients),
        "--rounds", str(rounds), "--timing-file", str(timing), "--dirichlet-alpha", str(alpha),
    ]  # fmt: skip
    if per_round and per_round < clients:
        command += ["--clients-per-round", str(per_round)]
    if variant == "baseline-cached":
        command.append("--cache-data")
    if variant == "flower-floor":
        command += ["--noop", "--confide-engine"]
    return command


class _RoundWatcher:
    """Notes when each round shows up in metrics.json (Confide) or the timing file (baseline)."""

    def __init__(self, path: Path, baseline: bool) -> None:
        self.path = path
        self.baseline = baseline
        self.seen: dict[int, float] = {}
        self._mtime = 0.0

    def __call__(self, now: float) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            if self.baseline:
                rounds = [json.loads(line)["round"] for line in self.path.read_text().splitlines()]
            else:
                rounds = [r["round"] for r in json.loads(self.path.read_text())["rounds"]]
        except (OSError, ValueError, KeyError):
            return  # caught mid-write; the next sample reads it
        for number in rounds:
            self.seen.setdefault(number, now)


def run_one(
    variant: str,
    clients: int,
    rounds: int,
    work: Path,
    per_round: int,
    timeout: float,
    alpha: float = DIRICHLET_ALPHA,
) -> RunResult:
    out = work / f"{variant}-{clients}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    if variant in BARE_FLOWER:
        timing = out / "rounds.jsonl"
        timing.unlink(missing_ok=True)
        command = _baseline_command(variant, clients, rounds, per_round, timing, alpha)
        watched = timing
    else:
        command, extra = _confide_command(variant, clients, rounds, out, alpha)
        env.update(extra)
        (out / "metrics.json").unlink(missing_ok=True)
        watched = out / "metrics.json"
    prefix = " ".join(f"{k}={v}" for k, v in env.items() if k == "BENCH_PATCHES")
    shown = (prefix + " " if prefix else "") + shlex.join(
        [c.replace(str(ROOT) + "/", "") for c in command]
    )
    print(f"\n== {variant} N={clients}: {shown}", flush=True)
    log_path = out / "run.log"
    watcher = _RoundWatcher(watched, variant in BARE_FLOWER)
    started = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with TreeSampler(process.pid, interval=0.2, on_sample=watcher) as sampler:
            try:
                code = process.wait(timeout=timeout)
                status = "completed" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = "timeout"
                os.killpg(process.pid, signal.SIGTERM)
                time.sleep(3)
            # whatever Ray left behind in this tree (our own processes only)
            for pid in sampler.members():
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            process.wait()
    wall = time.time() - started
    result = RunResult(variant, clients, rounds, shown, wall, status, log=str(log_path))
    stats: TreeStats = sampler.stats
    result.peak_rss, result.peak_pss, result.peak_procs = (
        stats.peak_rss,
        stats.peak_pss,
        stats.peak_procs,
    )
    result.peak_breakdown = stats.peak_breakdown[:12]
    result.rounds = _read_rounds(variant, watched, watcher)
    result.steady = _steady(result, stats)
    print(_one_line(result), flush=True)
    return result


def _read_rounds(variant: str, path: Path, watcher: _RoundWatcher) -> list[Round]:
    if not path.exists():
        return []
    rounds = []
    if variant in BARE_FLOWER:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for previous, line in itertools.pairwise(lines):
            rounds.append(
                Round(
                    line["round"],
                    line["time"] - previous["time"],
                    int(line.get("clients", 0)),
                    float(line.get("train_seconds", 0.0)),
                    line["time"],
                )
            )
        return rounds
    for record in json.loads(path.read_text()).get("rounds", []):
        clients = record["clients"]
        rounds.append(
            Round(
                record["round"],
                record["seconds"],
                len(clients),
                sum(c.get("train_seconds", 0.0) for c in clients),
                watcher.seen.get(record["round"], float("nan")),
            )
        )
    return rounds


def _steady(result: RunResult, stats: TreeStats) -> dict[str, Any]:
    steady = [r for r in result.rounds if r.round >= 2]
    note = ""
    if not steady and result.rounds:
        steady, note = result.rounds[:1], "round 1 only (includes warm-up)"
    if not steady:
        return {"note": "no round finished"}
    if not sum(r.clients for r in steady):
        return {"note": "no client answered"}
    cpu, machine, wall = 0.0, 0.0, 0.0
    for r in steady:
        between = stats.cpu_between(r.end - r.seconds, r.end)
        if between:
            cpu += between[0]
            machine += between[1]
            wall += r.seconds
    total_clients = sum(r.clients for r in steady)
    total_seconds = sum(r.seconds for r in steady)
    rate = total_clients / total_seconds  # throughput over the steady rounds together
    return {
        "rounds": [r.round for r in steady],
        "note": note,
        "clients_per_round": statistics.median(r.clients for r in steady),
        "seconds": statistics.median(r.seconds for r in steady),
        "client_rounds_per_s": rate,
        "full_round_seconds": result.clients / rate,
        "efficiency": sum(r.train_seconds for r in steady) / (total_seconds * CORES),
        "train_seconds_per_client": sum(r.train_seconds for r in steady) / total_clients,
        "tree_cpu_per_client_round": cpu / sum(r.clients for r in steady) if wall else None,
        "tree_cores": cpu / wall if wall else None,
        "others_cores": (machine - cpu) / wall if wall else None,
    }


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _one_line(result: RunResult) -> str:
    s = result.steady
    return (
        f"   {result.status}, wall {result.wall:.0f}s, rounds {[r.round for r in result.rounds]}; "
        f"steady: {_fmt(s.get('seconds'))} s/round, {_fmt(s.get('client_rounds_per_s'))} "
        f"client-rounds/s, efficiency {_fmt(s.get('efficiency'))}, "
        f"peak RSS {result.peak_rss / MiB:.0f} MiB (PSS {result.peak_pss / MiB:.0f} MiB) "
        f"{s.get('note', '')}"
    )


# ---------------------------------------------------------------------------------- report


def _versions() -> str:
    import flwr
    import opacus
    import ray
    import torch

    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{CORES} cores ({model}), {memory:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, Flower {flwr.__version__}, "
        f"Ray {ray.__version__}, PyTorch {torch.__version__}, Opacus {opacus.__version__}; "
        f"git {commit} (+ uncommitted work of other engineers)"
    )


def speedup(run: RunResult | None, reference: RunResult | None) -> float | None:
    """`run`'s steady client-rounds per second over `reference`'s, when both were measured."""
    key = "client_rounds_per_s"
    if run and reference and run.steady.get(key) and reference.steady.get(key):
        return run.steady[key] / reference.steady[key]
    return None


def report(results: list[RunResult], args: argparse.Namespace, load: tuple[float, ...]) -> str:
    by = {(r.variant, r.clients): r for r in results}
    lines = [
        "# Scale: seconds per round, client-rounds per second, efficiency, memory",
        "",
        f"Generated by `.venv/bin/python -m bench.scale {' '.join(args.argv)}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"**Machine:** {_versions()}. The machine is shared: load average at start "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; the `others` column is how many cores "
        "the rest of the machine used during the measured rounds.",
        "",
        "**Workload:** `bank` (UCI Bank Marketing, 45,211 records, 2/3 for training), "
        f"Dirichlet label skew with alpha = {args.dirichlet_alpha} (the scenario's 1.0 cannot give "
        "1,000 clients 2 records each), 1 local epoch, batch 64, Adam, Confide's default "
        "Transformer (width 32, depth 2). Every round trains and then evaluates every sampled "
        "client. Total data per round is the same at every N, so per-client work shrinks as N "
        "grows (1,000 clients: ~30 training records, one batch, each).",
        "",
        "**Definitions:** figures cover rounds 2..R (round 1 includes Ray/worker warm-up): "
        "s/round is their median; client-rounds/s = their clients / their seconds (summed); "
        "full round = N / client-rounds/s (extrapolated where the run sampled fewer than N "
        "clients per round). Efficiency = sum of the clients' `train_seconds` / (round seconds "
        f"x {CORES} cores), over the same rounds; both "
        f"variants use all {CORES} cores (Confide: 2 actors x 1 CPU; baseline: 1 actor x 2 "
        "CPUs, Flower's default). RSS = peak of the sum over the process tree (driver, Ray "
        "GCS/raylet/dashboard/monitors, workers), sampled every 0.2 s; PSS divides shared pages. "
        "CPU/client-round = CPU seconds of the whole tree per client-round (less sensitive to "
        "other users than wall time).",
        "",
        "| variant | N | clients/round | rounds used | s/round | client-rounds/s | "
        "full round (s) | efficiency | train s/client | CPU s/client-round | tree cores | "
        "others | peak RSS (MiB) | peak PSS (MiB) | procs | status |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r.steady
        sampled = s.get("clients_per_round") and s["clients_per_round"] < r.clients
        lines.append(
            f"| {r.variant} | {r.clients} | {_fmt(s.get('clients_per_round'), '.0f')} | "
            f"{','.join(map(str, s.get('rounds', []))) or '-'}"
            f"{' (warm-up incl.)' if s.get('note') else ''} | "
            f"{_fmt(s.get('seconds'), '.1f')} | {_fmt(s.get('client_rounds_per_s'))} | "
            f"{_fmt(s.get('full_round_seconds'), '.0f')}{' (extrapolated)' if sampled else ''} | "
            f"{_fmt(s.get('efficiency'))} | {_fmt(s.get('train_seconds_per_client'), '.3f')} | "
            f"{_fmt(s.get('tree_cpu_per_client_round'), '.3f')} | {_fmt(s.get('tree_cores'))} | "
            f"{_fmt(s.get('others_cores'))} | {r.peak_rss / MiB:.0f} | {r.peak_pss / MiB:.0f} | "
            f"{r.peak_procs} | {r.status}, {r.wall:.0f}s |"
        )
    lines += ["", "## Goals", ""]
    for n in args.sizes:
        c = by.get(("confide", n))
        if (ratio := speedup(c, by.get(("baseline", n)))) is not None:
            goal = " (goal >= 1.5 at 1,000)" if n == 1000 else ""
            lines.append(f"- N={n}: Confide / baseline client-rounds/s = **{ratio:.1f}x**{goal}")
        if (ratio := speedup(c, by.get(("baseline-cached", n)))) is not None:
            lines.append(f"- N={n}: Confide / baseline-cached client-rounds/s = **{ratio:.1f}x**")
        for name in PATCHES:
            if (ratio := speedup(by.get((name, n)), c)) is not None:
                lines.append(f"- N={n}: {name} / Confide client-rounds/s = **{ratio:.1f}x**")
    for n in (100, 1000):
        for variant in ("confide", *PATCHES):
            c = by.get((variant, n))
            if c and c.steady.get("efficiency") is not None:
                ok = "met" if c.steady["efficiency"] >= 0.7 else "NOT met"
                lines.append(
                    f"- N={n}: {variant} efficiency **{c.steady['efficiency']:.2f}** "
                    f"(goal >= 0.7: {ok})"
                )
    for variant in ("confide", "confide-patched"):
        small, large = by.get((variant, 10)), by.get((variant, 1000))
        if small and large and small.peak_rss:
            rss = large.peak_rss / small.peak_rss
            pss = large.peak_pss / small.peak_pss if small.peak_pss else float("nan")
            lines.append(
                f"- {variant}: RSS(1,000) / RSS(10) = **{rss:.2f}** (goal <= 1.25); "
                f"PSS ratio {pss:.2f}"
            )
    lines += ["", "## Commands", ""]
    lines += [f"- `{r.command}`" for r in results]
    lines += ["", "## Biggest processes at peak RSS", ""]
    for r in results:
        top = ", ".join(
            f"{(name.split() or ['?'])[0].rsplit('/', 1)[-1][:40]} {rss / MiB:.0f}"
            for _, name, rss in r.peak_breakdown[:6]
        )
        lines.append(f"- {r.variant} N={r.clients}: {top} (MiB)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument(
        "--variants",
        default="confide,baseline,baseline-cached,flower-floor",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Confide's rounds")
    parser.add_argument(
        "--rounds-1000", type=int, default=2, help="Confide's rounds at 1,000 clients"
    )
    parser.add_argument("--baseline-rounds", type=int, default=2)
    parser.add_argument(
        "--baseline-clients-per-round",
        type=int,
        default=10,
        help="clients the baseline samples per round (0: all); the full round is extrapolated",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=DIRICHLET_ALPHA,
        help="label skew of bank's split (10,000 clients need about 100 for 2 records each)",
    )
    parser.add_argument("--baseline-timeout", type=float, default=600)
    parser.add_argument("--work", default="/tmp/confide-scale")
    parser.add_argument("--out", default=str(RESULTS / "scale.md"))
    parser.add_argument(
        "--append", action="store_true", help="add this run's report to --out as a new section"
    )
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    args.argv = argv
    args.sizes = [int(n) for n in args.sizes.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")
    work = Path(args.work)
    load = os.getloadavg()
    results = []
    for n in args.sizes:
        for variant in variants:
            if variant == "baseline-cached" and n != max(args.sizes):
                continue  # the cached baseline answers one question: framework cost at the top N
            if variant in PATCHES and n != max(args.sizes):
                continue
            if variant in BARE_FLOWER:
                rounds, timeout = args.baseline_rounds, args.baseline_timeout
            else:
                rounds = args.rounds_1000 if n >= 1000 and variant == "confide" else args.rounds
                timeout = args.timeout
            per_round = 0 if variant == "flower-floor" else args.baseline_clients_per_round
            results.append(
                run_one(variant, n, rounds, work, per_round, timeout, args.dirichlet_alpha)
            )
    text = report(results, args, load)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = [asdict(r) for r in results]
    if args.append and out.exists():
        text = out.read_text() + "\n\n" + text.replace("# Scale:", "# Scale (additional run):", 1)
        previous = out.with_suffix(".json")
        if previous.exists():
            raw = json.loads(previous.read_text()) + raw
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
