"""`confide audit`: run a scenario with canaries planted at every simulated site, then turn the
sites' scores into an empirical lower bound on epsilon (common/privacy_audit.py).

The federation is the real one (ServerApp and ClientApp under Flower's simulation engine); the
canaries are planted and scored by the sites' own code (client/canaries.py), so here, acting for
the sites of a simulation, we only read their audit files, pool their guesses and compare the
bound with what their ledgers claim.

Canaries of all sites are pooled into one test: a record belongs to one site and only that
site's DP-SGD touches it, so the whole federation is (epsilon, delta)-DP in each record with the
largest epsilon any site's ledger records, and that is the claim the bound is set against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.canaries import (
    BLACK_BOX,
    WHITE_BOX,
    CanaryPlan,
    audit_file,
    input_canaries,
    input_canary_scores,
    read_audit_file,
)
from client.local_data import simulated_ledger_path
from common.atomic_file import write_json_atomically
from common.checkpoint import load_weights
from common.federated_model import build_federated_model
from common.lora import load_federated_state
from common.partition import client_split, partition_plan
from common.privacy_audit import (
    AuditSettingError,
    SiteScores,
    audit_bound,
    check_confidence,
    provable,
)
from common.privacy_ledger import dp_sgd_steps, recorded_entries, summarize
from common.run_config import RunConfig
from common.tasks import task_schema
from common.tradeoff_audit import Steps
from simulations.scenario import Scenario

TOTAL_CANARIES = 8000
"""Default canaries in all, split evenly over the sites. A bound comes from the few canaries the
scores are surest of, so more canaries mean more sure guesses: against DP-SGD's curve, 8,000
prove 0.59 of heart's claim at epsilon 8 on ideal replays, 4,000 0.54 and 16,000 no more than
8,000 (bench/results/audit-fdp.md)."""
DIRECTION_MEMORY = 256 * 2**20
"""The most bytes of white-box directions a site holds by default (m x d float32, and one m x d
product a step): heart's 2,000 a site take 138 MiB; a text Transformer of 600,000 weights gets
111 a site instead of gigabytes. --canaries overrides it."""
NO_CLAIM = "no claimed epsilon: the bound stands alone"


def audit_scenario(
    scenario: Scenario, kind: str | None, canaries: int | None, confidence: float
) -> Scenario:
    """The scenario with its audit settings, checked before anything runs."""
    check_confidence(confidence)
    config = scenario.config
    names, _ = partition_plan(config)
    kind = kind or (WHITE_BOX if config.dp else BLACK_BOX)
    if kind not in (WHITE_BOX, BLACK_BOX):
        raise AuditSettingError(f"--kind {kind!r}: use {WHITE_BOX} or {BLACK_BOX}")
    smallest = min(len(client_split(config, i).train) for i in range(len(names)))
    if canaries is None:
        canaries = max(1, TOTAL_CANARIES // len(names))
        if kind == BLACK_BOX:
            canaries = min(canaries, smallest)
        else:
            canaries = min(canaries, max(1, DIRECTION_MEMORY // (4 * trained_weights(config))))
    if canaries < 1:
        raise AuditSettingError(f"--canaries {canaries}: use at least 1 canary per site")
    if kind == BLACK_BOX and canaries > smallest:
        raise AuditSettingError(
            f"--canaries {canaries}: the smallest site has {smallest} training records and input "
            f"canaries may at most double a site's data; use --canaries {smallest} or fewer"
        )
    total = canaries * len(names)
    if provable(total, config.target_delta, confidence) == 0:
        raise AuditSettingError(
            f"--canaries {canaries}: {canaries} x {len(names)} sites at target-delta "
            f"{config.target_delta:g} can prove nothing even if every guess were right (too few "
            f"guesses, or a delta term 2 m delta = {2 * total * config.target_delta:.3g} too "
            "large); change --canaries or use a smaller target-delta"
        )
    overrides = {"audit-canaries": canaries, "audit-kind": kind}
    updated = RunConfig.from_mapping({**config.to_mapping(), **overrides}, source=scenario.name)
    return Scenario(scenario.name, scenario.description, updated, scenario.resources)


def trained_weights(config: RunConfig) -> int:
    """d, the length of a white-box canary's direction: every weight DP-SGD updates."""
    model = build_federated_model(task_schema(config), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class AuditResult:
    document: dict[str, Any]
    sites: list[SiteScores]


def site_scores(config: RunConfig) -> list[SiteScores]:
    """Each site's canary scores, as the site itself would compute them; a site that never
    trained (it dropped out of every round) contributes no canaries."""
    names, _ = partition_plan(config)
    model = None
    if config.audit_kind == BLACK_BOX:
        model = build_federated_model(task_schema(config), config)
        load_federated_state(model, load_weights(Path(config.run_dir) / "model.safetensors"))
    found = []
    for partition_id, name in enumerate(names):
        path = audit_file(config, name)
        if not path.is_file():
            continue
        document = read_audit_file(path)
        plan = CanaryPlan(name, document["kind"], document["canaries"], document["secret"])
        if plan.kind == WHITE_BOX:
            if not document["rounds"]:
                continue
            scores = np.sum([np.asarray(s) for s in document["rounds"].values()], axis=0)
        else:
            train = client_split(config, partition_id).train
            canaries = input_canaries(plan, train, len(task_schema(config).classes))
            scores = input_canary_scores(model, canaries)
        found.append(SiteScores(name, scores, plan.included()))
    return found


def site_plans(config: RunConfig, sites: list[SiteScores]) -> list[Steps]:
    """Each audited site's DP-SGD steps as its ledger records them (every run on it: steps
    without canaries only weaken the claim the audit tests, never overstate it)."""
    plans = []
    for site in sites:
        path = simulated_ledger_path(config, site.site)
        plans.append(dp_sgd_steps(recorded_entries(path)) if path.is_file() else [])
    return plans


def claimed_epsilon(config: RunConfig) -> float | None:
    """The largest epsilon any site's ledger records for its data set (None without DP)."""
    if not config.dp:
        return None
    ledgers = sorted((Path(config.run_dir) / "privacy-ledgers").glob("*.json"))
    spent = [run.epsilon for path in ledgers for run in summarize(path, config.target_delta)]
    return max(spent) if spent else None


def score_audit(config: RunConfig, confidence: float, seconds: float) -> AuditResult:
    """The bound, written to RUN/audit.json."""
    sites = site_scores(config)
    if not sites:
        raise AuditSettingError(
            f"no site left canary scores in {Path(config.run_dir) / 'audit'}: did every client "
            "drop out? lower dropout-fraction"
        )
    plans = site_plans(config, sites) if config.dp else []
    bound = audit_bound(sites, config.target_delta, confidence, plans)
    claim = claimed_epsilon(config)
    document = {
        "kind": config.audit_kind,
        "claimed_epsilon": claim,
        "delta": config.target_delta,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": confidence,
        "canaries": bound.canaries,
        "canaries_per_site": config.audit_canaries,
        "sites": [site.site for site in sites],
        "guesses": bound.guesses,
        "correct": bound.correct,
        "guess_fraction": bound.guess_fraction,
        "method": bound.method,
        "verdict": verdict(bound.epsilon_lower_bound, claim),
        "seconds": seconds,
    }
    write_json_atomically(Path(config.run_dir) / "audit.json", document)
    return AuditResult(document, sites)


def verdict(bound: float, claim: float | None) -> str:
    if claim is None:
        return NO_CLAIM
    if bound > claim:
        return (
            f"VIOLATION: the lower bound {bound:.3g} exceeds the claimed epsilon {claim:.3g}; "
            "the DP implementation or its accounting is wrong"
        )
    return f"consistent: lower bound {bound:.3g} <= claimed epsilon {claim:.3g}"


def run_audit(
    scenario: Scenario, confidence: float, run: Any, started: float | None = None
) -> AuditResult:
    """`run(scenario)` trains the federation (the CLI's simulate path); then score, write
    audit.json and the report's audit section."""
    from server.run_record import read_metrics
    from server.run_report import save_audit_plot, write_run_report

    started = time.perf_counter() if started is None else started
    run(scenario)
    result = score_audit(scenario.config, confidence, time.perf_counter() - started)
    run_dir = Path(scenario.config.run_dir)
    standardized = [(s.scores - s.scores.mean()) / (s.scores.std() or 1.0) for s in result.sites]
    included = np.concatenate([s.included for s in result.sites])
    pooled = np.concatenate(standardized)
    save_audit_plot(pooled[included], pooled[~included], result.document, run_dir)
    metrics = read_metrics(run_dir)
    if metrics is not None:
        write_run_report(metrics, run_dir)
    return result
