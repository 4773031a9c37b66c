"""Every benchmark of BENCHMARKS.md, one after another, each with its default settings (hours).

    .venv/bin/python -m bench.run_all                    # all of them (`make bench`)
    .venv/bin/python -m bench.run_all transport audit    # some of them, in the order given

Each runs as `python -m bench.NAME` in its own process, as BENCHMARKS.md quotes it, so one's Ray
processes and peak memory never leak into the next one's figures. Stops at the first that fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = (
    "foundation",
    "privacy",
    "site_policy",
    "scale",
    "strict_decoding",
    "transport",
    "secure_aggregation",
    "audit",
    "message_overhead",
    "ray_cluster",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    names = parser.parse_args().names or list(BENCHMARKS)  # not `choices`: an empty list fails it
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        print(f"== python -m bench.{name}", flush=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", f"bench.{name}"], check=False)
        if result.returncode != 0:
            sys.exit(f"bench.{name} failed (exit code {result.returncode}); stopped there")
        print(f"== bench.{name}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
