"""DP-LoRA figures: bytes each client sends per round, and the cost of a training step.

    .venv/bin/python -m bench.lora

The banking77 scenario's model (width 64, 32 tokens) started from the shipped CLINC150
checkpoint. Bytes: the ArrayRecord a client replies with (its arrays' .npy bytes, what Flower
moves). Steps: batch 64, 1 thread, the three set-ups timed in turn within each repeat, so load on
a shared machine falls on all of them alike; the median over repeats of each repeat's median.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord
from torch.nn import functional as F

from bench.harness import setup_line, write_section
from client.privacy.optimizer import FlatPrivacyEngine
from client.training import make_optimizer
from common.evaluation import make_loader
from common.federated_model import build_federated_model, initial_federated_state
from common.run_config import RunConfig
from common.tasks import load_task

SCENARIO = {
    "task": "banking77",
    "partitioner": "iid",
    "num-clients": 1,
    "max-length": 32,
    "model-width": 64,
    "init-checkpoint": "clinc150-text.safetensors",
}
RANK = 8
BATCH, WARMUP, STEPS, REPEATS = 64, 5, 30, 5

Step = Callable[[], None]


def reply_bytes(config: RunConfig) -> int:
    record = ArrayRecord(initial_federated_state(load_task(config).schema, config))
    return sum(len(array.data) for array in record.values())


def training_step(config: RunConfig, private: bool) -> Step:
    """One SGD step as the ClientApp takes it: plain, or Opacus DP-SGD (ew, Confide's flat
    optimizer, fixed batches so every set-up sees the same batch size)."""
    task = load_task(config)
    model = build_federated_model(task.schema, config)
    optimizer = make_optimizer("sgd", model, 0.1, 0.0)
    loader = make_loader(task.dataset, BATCH, shuffle=True)
    if private:
        warnings.filterwarnings("ignore")
        model, optimizer, loader = FlatPrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ew",
        )  # fmt: skip
    batches = iter(loader)

    def step() -> None:
        *inputs, labels = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(*inputs), labels).backward()
        optimizer.step()

    return step


def median_ms(step: Step) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed repeats per step")
    repeats = parser.parse_args().repeats
    torch.manual_seed(0)
    torch.set_num_threads(1)
    full = RunConfig.from_mapping(SCENARIO)
    lora = dataclasses.replace(full, lora_rank=RANK)
    steps = {
        "full model, non-private": lambda: training_step(full, private=False),
        f"LoRA rank {RANK}, non-private": lambda: training_step(lora, private=False),
        f"DP-LoRA rank {RANK} (ew)": lambda: training_step(lora, private=True),
    }
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, make in steps.items():
            runs[name].append(median_ms(make()))
    full_bytes, lora_bytes = reply_bytes(full), reply_bytes(lora)
    baseline = statistics.median(runs[f"LoRA rank {RANK}, non-private"])
    lines = [
        setup_line(),
        "",
        "| what a client sends per round | bytes |",
        "| --- | --- |",
        f"| full model | {full_bytes:,} |",
        f"| LoRA rank {RANK} adapters + head | {lora_bytes:,} ({full_bytes / lora_bytes:.0f}x fewer) |",
        "",
        f"| step (batch {BATCH}, 1 thread) | ms | x non-private LoRA |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {statistics.median(ms):.1f} | {statistics.median(ms) / baseline:.2f} |"
            for name, ms in runs.items()
        ),
    ]
    path = write_section("lora", "\n".join(lines) + "\n")
    print("\n".join(lines), f"\n\nwritten to {path}", sep="")


if __name__ == "__main__":
    main()
