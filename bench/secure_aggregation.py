"""What SecAgg+ costs a round: per-round wall time, plaintext vs TLS vs TLS + SecAgg+.

    .venv/bin/python -m bench.secure_aggregation                  # 2 and 10 clients
    .venv/bin/python -m bench.secure_aggregation --clients 2 --rounds 2

The real deployment of bench/transport.py (its `measure`: coordinator, nginx, one SuperNode per
site on 127.0.0.1); TLS + SecAgg+ is the TLS path with `secagg = true`. Round times are the
ServerApp's own (train + evaluate), medians over rounds; default heart model, one local epoch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from bench.harness import setup_line, write_section
from bench.transport import Measurement, measure

MODES = ("plaintext", "TLS", "TLS+SecAgg+")
GOAL_RATIO = 3.0  # SecAgg+ round time over plaintext's


def report(results: list[Measurement], command: str, load: tuple[float, float]) -> str:
    by_key = {(m.transport, m.clients): m for m in results}
    lines = [
        "## Secure aggregation: SecAgg+ round time",
        "",
        f"`{command}` on {setup_line()}; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (a shared machine: wall times are noisy).",
        "",
        "Deployment as in transport.md (SuperLink behind nginx, one `flower-supernode` per site, "
        "127.0.0.1). TLS + SecAgg+ = the TLS path with `secagg = true` (Flower's SecAgg+, all "
        "sampled clients share keys, reconstruction threshold 0.5). Round time = the ServerApp's "
        "train + evaluate time, median over rounds. Default heart model, 1 local epoch.",
        "",
        "| clients | mode | rounds | round time, s (min-max) |",
        "|---:|---|---:|---:|",
    ]
    for m in results:
        spread = f"{min(m.round_seconds):.1f}-{max(m.round_seconds):.1f}"
        lines.append(f"| {m.clients} | {m.transport} | {m.rounds} | {m.seconds:.1f} ({spread}) |")
    lines += [
        "",
        "| clients | TLS / plaintext | TLS+SecAgg+ / plaintext | goal |",
        "|---:|---:|---:|---|",
    ]
    for clients in sorted({m.clients for m in results}):
        plain = by_key.get(("plaintext", clients))
        tls, secure = by_key.get(("TLS", clients)), by_key.get(("TLS+SecAgg+", clients))
        if plain and secure:
            ratio = secure.seconds / plain.seconds
            tls_ratio = f"{tls.seconds / plain.seconds:.2f}" if tls else "-"
            met = "met" if ratio <= GOAL_RATIO else "**missed**"
            lines.append(f"| {clients} | {tls_ratio} | {ratio:.2f} | <= {GOAL_RATIO:.0f}: {met} |")
    lines += [
        "",
        "Reading the table: a SecAgg+ round sends each site four train messages (setup, share "
        "keys, masked model, unmask) where a plain round sends one, and every message starts a "
        "fresh `flwr-clientapp` process on the site (Flower's deployment model); that start-up, "
        "not the cryptography, is most of the extra time.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    # `timeout`, CI and kill send SIGTERM: unwind through the finally blocks that stop processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    args = parser.parse_args()
    counts = sorted(set(args.clients))
    load_start = os.getloadavg()[0]
    command = " ".join(["python -m bench.secure_aggregation", *sys.argv[1:]])
    results: list[Measurement] = []

    def record(measurement: Measurement) -> None:
        """Print and write after every configuration: a long run's figures survive a late crash."""
        results.append(measurement)
        print(f"{measurement.transport:11} {measurement.clients:2} clients: "
              f"{measurement.seconds:6.1f} s/round", flush=True)  # fmt: skip
        write_section(
            "secure-aggregation", report(results, command, (load_start, os.getloadavg()[0]))
        )

    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"confide-bench-{mode}-") as scratch:
            measure(mode, counts, {c: args.rounds for c in counts}, Path(scratch), record)
    print("wrote bench/results/secure-aggregation.md")


if __name__ == "__main__":
    main()
