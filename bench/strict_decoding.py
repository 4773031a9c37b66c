"""Strict decoding of received weights against the lenient reader it replaced: same speed?

    .venv/bin/python -m bench.strict_decoding [BEFORE_COMMIT]   # default 566747c

Loads `common/received_weights.py` and `server/update_validation.py` as they were at
BEFORE_COMMIT (`git show`) beside today's, and times both on the bundled models' weights:
`torch_state_dict` (what a client pays per message) and `screen_update` (what the coordinator
pays per reply). Old and new alternate in each of 61 repeats, CPU time, so load on a shared
machine hits both alike; the ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import common.received_weights as new_weights
import server.update_validation as new_validation
from common.model_factory import build_model
from common.run_config import PROJECT_ROOT, RunConfig
from common.tasks import task_schema

REPEATS = 61
CALLS = 20


def _module_at(commit: str, path: str, name: str, folder: Path) -> ModuleType:
    text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=PROJECT_ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    text = text.replace("from common.received_weights import", "from old_received_weights import")
    file = folder / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cpu_microseconds(call: Callable[[], object]) -> float:
    start = time.process_time()
    for _ in range(CALLS):
        call()
    return (time.process_time() - start) / CALLS * 1e6


def compare(old: Callable[[], object], new: Callable[[], object]) -> tuple[float, float, float]:
    olds, news = [], []
    for _ in range(REPEATS):
        olds.append(_cpu_microseconds(old))
        news.append(_cpu_microseconds(new))
    ratio = statistics.median(n / o for o, n in zip(olds, news, strict=True))
    return statistics.median(olds), statistics.median(news), ratio


def calls(task: str, old_weights: ModuleType, old_validation: ModuleType) -> dict[str, tuple]:
    """(before, after) pairs for one model's weights and a genuine reply to screen."""
    config = RunConfig.from_mapping({"task": task})
    record = ArrayRecord(build_model(task_schema(config), config).state_dict())
    update = ArrayRecord({n: Array(a.numpy() + np.float32(0.01)) for n, a in record.items()})
    content = RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 10})})
    reply = Message(content=content, dst_node_id=1, message_type="train")
    old_policy = old_validation.UpdatePolicy(0.0, "reject", 10**6)
    new_policy = new_validation.UpdatePolicy(0.0, "reject", 10**6)
    old_ref = old_validation.global_values(record)
    new_ref = new_validation.global_values(record)
    assert new_validation.screen_update(reply, record, new_policy, new_ref) is None
    return {
        f"{task} ({len(record)} tensors) | torch_state_dict": (
            lambda: old_weights.torch_state_dict(record),
            lambda: new_weights.torch_state_dict(record),
        ),
        f"{task} ({len(record)} tensors) | screen_update": (
            lambda: old_validation.screen_update(reply, record, old_policy, old_ref),
            lambda: new_validation.screen_update(reply, record, new_policy, new_ref),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "commit",
        nargs="?",
        default="566747c",
        help="the lenient reader's commit (default: %(default)s)",
    )
    commit = parser.parse_args().commit
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    with tempfile.TemporaryDirectory() as scratch:
        old_weights = _module_at(commit, "common/received_weights.py", "old_received_weights",
                                 Path(scratch))  # fmt: skip
        old_validation = _module_at(commit, "server/update_validation.py", "old_validation",
                                    Path(scratch))  # fmt: skip
        print("| model | call | before (us) | after (us) | after / before |")
        print("| --- | --- | --- | --- | --- |")
        for task in ("heart", "banking77"):
            for label, (old, new) in calls(task, old_weights, old_validation).items():
                before, after, ratio = compare(old, new)
                print(f"| {label} | {before:.0f} | {after:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
