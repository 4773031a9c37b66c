"""Figures of `confide audit`: tightness (lower bound / claimed epsilon) at epsilon 8, 3 and 1,
white-box and black-box, the audit's wall time, and what the canaries cost the model's accuracy.

Each setting runs the real `confide audit` (Flower's simulation engine) `--repeats` times and
reports medians and every run; results land in bench/results/audit.json (or --out).

    .venv/bin/python -m bench.audit --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint import load_weights
from common.evaluation import evaluate
from common.federated_model import build_federated_model
from common.lora import load_federated_state
from common.partition import client_split, partition_plan
from common.privacy_audit import audit_bound
from common.run_config import RunConfig
from common.tasks import task_schema
from simulations.audit import site_scores

RESULTS = Path(__file__).parent / "results"
RUN_KEYS = (
    "epsilon_lower_bound", "claimed_epsilon", "canaries", "guesses", "correct", "guess_fraction",
    "method", "steinke_bound", "wall_seconds", "accuracy_with_canaries", "accuracy_without",
)  # fmt: skip


def confide(*args: str) -> None:
    command = [sys.executable, "-c", "from confide.cli import main; main()", *args, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: a bound above the claim, still a measurement
        raise RuntimeError(done.stderr)


def final_accuracy(run_dir: Path) -> float:
    """The released model's accuracy on all sites' test records, pooled: under DP the run's own
    figure is the sites' noisy evaluation (0 to 0.98 on heart at epsilon 1), too noisy to
    compare runs with and without canaries."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = RunConfig.from_mapping(metrics["config"])
    model = build_federated_model(task_schema(config), config)
    load_federated_state(model, load_weights(run_dir / "model.safetensors"))
    names, _ = partition_plan(config)
    results = [
        evaluate(model, client_split(config, i).test, 256, torch.device("cpu"))
        for i in range(len(names))
    ]
    correct = sum(r.accuracy * r.num_examples for r in results)
    return correct / sum(r.num_examples for r in results)


def audit_once(scenario: str, epsilon: float | None, kind: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        run_dir = Path(directory)
        settings = ["--set", "dp=true", "--set", f"target-epsilon={epsilon}"] if epsilon else []
        started = time.perf_counter()
        confide("audit", scenario, *settings, "--kind", kind, "--rounds", str(rounds),
                "--out", str(run_dir))  # fmt: skip
        seconds = time.perf_counter() - started
        audit = json.loads((run_dir / "audit.json").read_text())
        config = RunConfig.from_mapping(
            json.loads((run_dir / "metrics.json").read_text())["config"]
        )
        steinke = audit_bound(site_scores(config), config.target_delta, audit["confidence"])
        audited = final_accuracy(run_dir)
        confide(
            "simulate",
            scenario,
            *settings,
            "--rounds",
            str(rounds),
            "--out",
            str(run_dir / "plain"),
        )
        return {
            **audit,
            "steinke_bound": steinke.epsilon_lower_bound,  # the same scores, one (eps, delta)
            "wall_seconds": seconds,
            "accuracy_with_canaries": audited,
            "accuracy_without": final_accuracy(run_dir / "plain"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="heart")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--kinds", nargs="+", default=["white-box-gradient", "black-box-input"])
    parser.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    arguments = parser.parse_args()
    rows = []
    for epsilon in arguments.epsilons:
        for kind in arguments.kinds:
            runs = [
                audit_once(arguments.scenario, epsilon, kind, arguments.rounds)
                for _ in range(arguments.repeats)
            ]
            bounds = [run["epsilon_lower_bound"] for run in runs]
            claims = [run["claimed_epsilon"] for run in runs]
            rows.append(
                {
                    "epsilon": epsilon,
                    "kind": kind,
                    "bounds": bounds,
                    "claims": claims,
                    "median_steinke_bound": statistics.median(r["steinke_bound"] for r in runs),
                    "median_tightness": statistics.median(
                        b / c for b, c in zip(bounds, claims, strict=True)
                    ),
                    "any_above_claim": any(b > c for b, c in zip(bounds, claims, strict=True)),
                    "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
                    "median_accuracy_with_canaries": statistics.median(
                        r["accuracy_with_canaries"] for r in runs
                    ),
                    "median_accuracy_without": statistics.median(
                        r["accuracy_without"] for r in runs
                    ),
                    "runs": [{key: run[key] for key in RUN_KEYS} for run in runs],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
