"""What `confide audit` could prove at best about a run's DP-SGD: each site's steps as its ledger
records them (Poisson rate, noise multiplier, count), replayed with ideal white-box canaries
(no model, no cross-talk, exact noise), scored by the likelihood ratio the sites use
(client/canaries.py) or by the plain sum of the canary's signal (the model change the audit
scored before), and guessed on several grids under the same union bound.

    .venv/bin/python -m bench.audit_ceiling RUN_DIR --canaries 1000 4000 10000 --seeds 8
    .venv/bin/python -m bench.audit_ceiling RUN_DIR --tradeoff --canaries 4000 8000 16000

RUN_DIR is a `confide audit` run (its privacy-ledgers/); results land in
bench/results/audit-guess-grid.md, or with --tradeoff (the sites' DP-SGD curve tested,
common/tradeoff_audit.py, beside the (epsilon, delta) test on the same likelihood-ratio scores)
in bench/results/audit-fdp.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.privacy_audit import (
    GUESS_FRACTIONS,
    TRADEOFF_GUESS_FRACTIONS,
    SiteScores,
    audit_bound,
    epsilon_lower_bound,
    pooled_guesses,
)
from common.tradeoff_audit import ClaimFamily, lower_bound

RESULTS = Path(__file__).parent / "results"
Steps = list[tuple[float, float]]  # (Poisson rate, noise multiplier), one per DP-SGD step
Shares = Sequence[tuple[float, float]]  # (share guessed in, share guessed out) per test
TRADEOFF_SHARES = {"5, 10% (default)": TRADEOFF_GUESS_FRACTIONS, "5-40%": GUESS_FRACTIONS}
GRIDS: dict[str, Shares] = {
    "previous (5-90%)": [(f / 2, f / 2) for f in (0.05, 0.15, 0.4, 0.9)],
    "default (5-40%)": [(f / 2, f / 2) for f in GUESS_FRACTIONS],
    "each side apart (15 tests)": [
        pair for pair in itertools.product((0, 0.05, 0.1, 0.2), repeat=2) if sum(pair)
    ],
}


def ledger_steps(run_dir: Path) -> dict[str, Steps]:
    """Every DP-SGD step of every site, from the ledgers the audited run wrote."""
    sites = {}
    for path in sorted((run_dir / "privacy-ledgers").glob("*.json")):
        for site, dataset in json.loads(path.read_text())["datasets"].items():
            sites[site] = [
                (entry["sample_rate"], entry["noise_multiplier"])
                for entry in dataset["entries"]
                if entry["purpose"] == "train"
                for _ in range(entry["steps"])
            ]
    return sites


def replay(steps: Steps, included: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each canary's signal along its direction, step by step, in units of max-grad-norm."""
    scores = {"likelihood ratio": np.zeros(len(included)), "sum": np.zeros(len(included))}
    for rate, sigma in steps:
        x = (included & (rng.random(len(included)) < rate)) + sigma * rng.standard_normal(
            len(included)
        )
        scores["sum"] += x
        drawn = np.log(rate) + (2 * x - 1) / (2 * sigma**2)
        scores["likelihood ratio"] += np.logaddexp(np.log1p(-rate), drawn)
    return scores


def best_bound(sites: list[SiteScores], shares: Shares, delta: float) -> float:
    """The best bound over `shares`, each site ranking its own scores, each test at 0.05 / n."""
    total = sum(len(site.scores) for site in sites)
    level = 1 - 0.05 / len(shares)
    best = 0.0
    for share_in, share_out in shares:
        guesses = correct = 0
        for site in sites:
            order = np.argsort(site.scores, kind="stable")
            count_in, count_out = (round(s * len(order)) for s in (share_in, share_out))
            guesses += count_in + count_out
            correct += int(site.included[order[len(order) - count_in :]].sum())
            correct += int((~site.included[order[:count_out]]).sum())
        best = max(best, epsilon_lower_bound(total, guesses, correct, delta, level))
    return best


def replayed_run(
    sites: dict[str, Steps], canaries: int, seed: int
) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """Every site's canaries through its DP-SGD steps: (site, included, scores)."""
    rng = np.random.default_rng(seed)
    per_site = canaries // len(sites)
    replayed = []
    for name, steps in sites.items():
        included = rng.random(per_site) < 0.5
        replayed.append((name, included, replay(steps, included, rng)))
    return replayed


def ceiling(
    sites: dict[str, Steps], canaries: int, seed: int, delta: float
) -> dict[tuple[str, str], float]:
    """One replayed run: the bound of every score and grid."""
    replayed = replayed_run(sites, canaries, seed)
    results = {}
    for score, (grid, shares) in itertools.product(("likelihood ratio", "sum"), GRIDS.items()):
        scored = [SiteScores(name, s[score], inc) for name, inc, s in replayed]
        results[(score, grid)] = best_bound(scored, shares, delta)
    return results


def tradeoff_ceiling(
    sites: dict[str, Steps], canaries: int, seed: int, family: ClaimFamily
) -> dict[tuple[str, str], float]:
    """One replayed run, likelihood-ratio scores: the f-DP bound with each share set, and the
    default (epsilon, delta) test on the same scores."""
    replayed = replayed_run(sites, canaries, seed)
    scored = [SiteScores(name, s["likelihood ratio"], inc) for name, inc, s in replayed]
    results = {("f-DP", label): lower_bound(
        family, canaries, [pooled_guesses(scored, f) for f in fractions], 0.95
    ).epsilon_lower_bound for label, fractions in TRADEOFF_SHARES.items()}  # fmt: skip
    results[("Steinke", "5-40%")] = audit_bound(scored, family.delta, 0.95).epsilon_lower_bound
    return results


def summary(bounds: list[float], claim: float) -> str:
    median = statistics.median(bounds)
    return f"{median:.2f} | {min(bounds):.2f}-{max(bounds):.2f} | {median / claim:.2f}"


def table(rows: dict[tuple[int, str, str], list[float]], claim: float) -> str:
    lines = [
        "| canaries | score or test | guess grid | median bound | range | median / claim |",
        "| ---: | --- | --- | ---: | --- | ---: |",
    ]
    lines += [
        f"| {m} | {score} | {grid} | {summary(b, claim)} |" for (m, score, grid), b in rows.items()
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--canaries", type=int, nargs="+", default=[1000, 4000, 10000])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--claim", type=float, default=8.0)
    parser.add_argument("--tradeoff", action="store_true", help="the f-DP test against Steinke's")
    arguments = parser.parse_args()
    sites = ledger_steps(arguments.run_dir)
    family = ClaimFamily(
        [[(sigma, q, 1) for q, sigma in s] for s in sites.values()], arguments.delta
    )
    rows: dict[tuple[int, str, str], list[float]] = {}
    for canaries, seed in itertools.product(arguments.canaries, range(arguments.seeds)):
        if arguments.tradeoff:
            bounds = tradeoff_ceiling(sites, canaries, seed, family)
        else:
            bounds = ceiling(sites, canaries, seed, arguments.delta)
        for (test, grid), bound in bounds.items():
            rows.setdefault((canaries, test, grid), []).append(bound)
            print(canaries, seed, test, grid, round(bound, 3), flush=True)
    steps = ", ".join(f"{name} {len(s)} steps at q {s[0][0]:.3g}, sigma {s[0][1]:.3g}"
                      for name, s in sites.items())  # fmt: skip
    text = (
        f"# Ceiling of the one-run audit (`python -m bench.audit_ceiling`)\n\n"
        f"Replayed from {arguments.run_dir.name}: {steps}; delta {arguments.delta:g}, 95%, "
        f"{arguments.seeds} seeds, claimed epsilon {arguments.claim:g}.\n\n"
        f"{table(rows, arguments.claim)}\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("audit-fdp.md" if arguments.tradeoff else "audit-guess-grid.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
