"""`confide` with candidate library changes applied by monkeypatching, to measure them before anyone
edits library code. Nothing outside bench/ imports this.

    BENCH_PATCHES=dispatch,nice python -m bench.patched_confide simulate bank --clients 1000 ...

Patches (comma-separated in BENCH_PATCHES):

- dispatch: one pass over Flower's message store per dispatch sweep instead of one per node
  (measured 2.1x more client-rounds/s at 1,000 clients). Confide now does this itself
  (`simulations/dispatch.py`), so the patch is accepted for old commands and does nothing.
- nice: Ray starts its workers at niceness 15 (`RAY_worker_niceness`), so on a shared or busy
  machine the clients' training yields to every normal process, the driver's own threads
  included. The patch sets it to 0.

(A third patch, `client`, measured the per-worker model and run-config cache; the ClientApp now
does that itself, see `client/app.py`. Likewise `nice` is now what `simulations/engine.py` sets, so
with both patches now in Confide this module adds nothing, except that `nice` overrides a
`RAY_worker_niceness` already set in the environment, which Confide leaves alone.)
"""

from __future__ import annotations

import os
import sys


def apply(patches: set[str]) -> None:
    unknown = patches - {"dispatch", "nice"}  # dispatch: accepted, a no-op (see above)
    if unknown:
        raise SystemExit(f"BENCH_PATCHES: unknown patch(es) {sorted(unknown)}")
    if "nice" in patches:
        os.environ["RAY_worker_niceness"] = "0"


def main() -> None:
    apply({p for p in os.environ.get("BENCH_PATCHES", "").split(",") if p})
    from confide.cli import main as confide_main

    sys.argv[0] = "confide"
    confide_main()


if __name__ == "__main__":
    main()
