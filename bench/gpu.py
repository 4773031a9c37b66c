"""DP-SGD simulations on a GPU, four virtual clients per GPU (`gpus-per-client = 0.25`).

    .venv/bin/python -m bench.gpu [--rounds 3]

Prepared for a machine with a CUDA GPU (this project's own has none; tests never need one): for
a tabular task (heart, 4 hospitals) and a text task (banking77, 10 banks), with and without DP-SGD,
it runs `confide simulate` from a scenario that adds `[resources] gpus-per-client = 0.25`, and
reports client-rounds per second (clients x rounds / the rounds' own seconds) and the local
training seconds per client-round (the same steps with and without DP: the cost of per-sample
clipping and noise on the GPU). Writes bench/results/gpu.md; copy its table into BENCHMARKS.md.
On a machine without a GPU it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.harness import confide, setup_line, write_section
from simulations.scenario import SCENARIO_DIR

TASKS = {"tabular": "heart", "text": "banking77"}
GPUS_PER_CLIENT = 0.25


def gpu_scenario(task: str, folder: Path) -> Path:
    """The preset with four clients to a GPU (a scenario's [resources] table)."""
    path = folder / f"{task}-gpu.toml"
    preset = (SCENARIO_DIR / f"{task}.toml").read_text()
    path.write_text(
        f"{preset}\n[resources]\ncpus-per-client = 1\ngpus-per-client = {GPUS_PER_CLIENT}\n"
    )
    return path


def measure(scenario: Path, dp: bool, rounds: int, out: Path) -> tuple[float, float]:
    """(client-rounds per second, local training seconds per client-round)."""
    metrics, _ = confide(
        "simulate", str(scenario), "--rounds", str(rounds), "--set", f"dp={str(dp).lower()}",
        "--set", "training-metrics=exact", "--out", str(out),
    )  # fmt: skip
    rounds_done = metrics["rounds"]
    client_rounds = sum(len(entry["clients"]) for entry in rounds_done)
    seconds = sum(entry["seconds"] for entry in rounds_done)
    training = [c["train_seconds"] for entry in rounds_done for c in entry["clients"]]
    return client_rounds / seconds, statistics.median(training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU on this machine; run it where one is", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for kind, task in TASKS.items():
            scenario = gpu_scenario(task, folder)
            plain = measure(scenario, False, args.rounds, folder / f"{task}-plain")
            private = measure(scenario, True, args.rounds, folder / f"{task}-dp")
            rows.append(
                f"| {kind} ({task}) | {plain[0]:.1f} | {private[0]:.1f} | {plain[1]:.3f} | "
                f"{private[1]:.3f} | {private[1] / plain[1]:.2f}x |"
            )
    body = "\n".join([
        "## DP-SGD simulations on a GPU",
        "",
        f"`python -m bench.gpu --rounds {args.rounds}` on {setup_line()}, "
        f"{torch.cuda.get_device_name(0)}; {GPUS_PER_CLIENT} GPU per client.",
        "",
        "| task | client-rounds/s, no DP | client-rounds/s, DP-SGD | training s per client-round, "
        "no DP | DP-SGD | DP / no DP |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])  # fmt: skip
    print(body)
    print(write_section("gpu", body + "\n"))


if __name__ == "__main__":
    main()
