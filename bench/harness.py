"""What every benchmark needs: run `confide` as a user would, read the run directory, summarise.

Figures are medians over repeats (this machine is shared and noisy) and every table records the
exact command that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def confide(*args: str, timeout: float = 3600) -> tuple[dict[str, Any], float]:
    """Run `confide simulate ...`; returns (metrics.json, wall seconds). The last args must hold
    `--out DIR`."""
    out = Path(args[args.index("--out") + 1])
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "confide", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"confide {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def mean_site_accuracy(metrics: dict[str, Any]) -> float:
    """FLamby's figure: the unweighted mean of each site's accuracy on its own test set."""
    clients = metrics["rounds"][-1]["clients"]
    return statistics.fmean(client["accuracy"] for client in clients)


def setup_line() -> str:
    import flwr
    import opacus

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}, "
        f"opacus {opacus.__version__}"
    )


def write_section(name: str, markdown: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
