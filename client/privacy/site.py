"""A DP site's two replies, planned and charged in one place: what client/app.py calls under DP.

`private_train` and `private_evaluate` take a model whose weights were already checked
(client/site_inputs.py) and the site's records, and return the reply's metrics: every value in
them is the release gate's output or computed from it and the site's own settings, and the keys
are fixed. The released model is checked finite before it may leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from client.privacy.evaluation import evaluate_privately
from client.privacy.gate import NonFiniteRelease, ReleaseGate
from client.privacy.optimizer import CanarySource
from client.privacy.plan import SitePrivacy, plan_run
from client.privacy.training import train_privately
from client.training import stop_if_expired
from common.lora import federated_state
from common.partition import ClientSplit
from common.privacy_ledger import BudgetExhausted, LedgerEntry
from common.run_config import RunConfig
from common.site_policy import PolicyRefusal


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator's message fixes for the site: whose round, and until when."""

    run_id: str
    server_round: int
    deadline: float | None
    device: torch.device


def private_train(
    model: nn.Module,
    split: ClientSplit,
    config: RunConfig,
    site: SitePrivacy,
    request: RoundRequest,
    canaries: CanarySource | None = None,
) -> dict[str, float]:
    stop_if_expired(request.deadline)  # a round already over costs nothing, not even the count
    gate = ReleaseGate()
    plan = plan_run(config, site, gate, request.run_id, request.server_round, len(split.train))
    private = train_privately(
        model, split.train, config, site, plan, gate, (request.run_id, request.server_round),
        request.device, request.deadline, canaries,
    )  # fmt: skip
    check_finite(model)
    metrics = {
        "num-examples": private.num_examples,
        "noise-multiplier": private.noise_multiplier,
        "epsilon-round": private.epsilon_round,
        "epsilon": private.epsilon_total,
        "delta": private.delta,
    }
    if config.training_metrics == "exact":  # the run asked, the site's policy allowed it
        metrics |= {
            "train-loss": private.result.loss,
            "train-accuracy": private.result.accuracy,
            "train-seconds": private.result.seconds,
        }
    return metrics


def private_evaluate(
    model: nn.Module,
    split: ClientSplit,
    config: RunConfig,
    site: SitePrivacy,
    request: RoundRequest,
) -> dict[str, float]:
    """One Gaussian mechanism per reply, charged before it leaves; off if the policy says so."""
    policy = site.policy
    if policy.evaluation == "off":
        raise PolicyRefusal(
            f"refused by site policy ({policy.source}): evaluation = 'off', but the run asks "
            "for an evaluation reply"
        )
    gate = ReleaseGate()
    run_id = request.run_id
    plan = plan_run(config, site, gate, run_id, request.server_round, len(split.train))
    answered = sum(e.run_id == run_id and e.purpose == "evaluate" for e in site.ledger.entries())
    if answered >= plan.evaluations:  # a coordinator may not drain the budget through evaluation
        raise BudgetExhausted(
            f"this run's {plan.evaluations} planned evaluation replies are spent; the site answers "
            "no more"
        )
    assert plan.evaluation_sigma is not None
    entry = LedgerEntry(
        run_id, request.server_round, plan.evaluation_sigma, 1.0, 1, purpose="evaluate"
    )
    epsilon = site.ledger.charge(plan.budget, entry, site.source)
    released = evaluate_privately(model, split.test, plan.evaluation_sigma, request.device, gate)
    return {
        "num-examples": released.num_examples,
        "loss": released.loss,
        "accuracy": released.accuracy,
        "epsilon": epsilon,
        "delta": plan.budget.target_delta,
    }


def check_finite(model: nn.Module) -> None:
    """The update about to leave: finite, or not sent at all."""
    if not all(bool(torch.isfinite(t).all()) for t in federated_state(model).values()):
        raise NonFiniteRelease("the site's update came out non-finite; not sent")
