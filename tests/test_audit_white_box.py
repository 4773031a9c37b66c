"""White-box gradient canaries at one site's DP-SGD training function (no Flower): the audit
has power when there is no real noise, stays below the claim when DP-SGD is right, and catches
DP-SGD when its noise is quietly cut while the ledger records the original sigma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.canaries import GradientCanaries, SiteAudit, audit_file, read_audit_file
from client.privacy.optimizer import FlatPrivacyEngine
from client.privacy.plan import SitePrivacy
from client.privacy.site import RoundRequest, private_train
from common.model_factory import build_model
from common.partition import client_split
from common.privacy import epsilon_of
from common.privacy_audit import STEINKE, TRADEOFF, AuditBound, SiteScores, audit_bound
from common.privacy_ledger import PrivacyLedger, dp_sgd_steps
from common.run_config import RunConfig
from common.site_policy import SitePolicy
from common.tasks import task_schema

CANARIES = 1000
# Cleveland's 200 records in batches of 64: 4 steps an epoch, so each record (and canary) is
# drawn about once per epoch, 20 times over 4 rounds x 5 epochs, at a fraction of the steps.
FAST = {"task": "heart", "batch-size": 64, "local-epochs": 5, "num-server-rounds": 4}
# The sigma that calibration picks for that plan (q = 1/4, 80 steps, delta 1e-5, PRV), fixed
# here so each test skips the calibration search; the ledger still accounts every round.
SIGMA_AT = {8.0: 1.5735, 1.0: 8.5938}


def permissive_site(config: RunConfig, ledger: PrivacyLedger) -> SitePrivacy:
    """A site whose policy lets the run's own settings through: no released count or
    evaluation, so the ledger holds DP-SGD's rounds alone."""
    policy = SitePolicy(
        max_epsilon=1e9, min_noise_multiplier=0.0, accountant=config.accountant,
        delta=config.target_delta, evaluation="off", example_count="exact",
    )  # fmt: skip
    return SitePrivacy(policy, ledger, "test", config.max_grad_norm)


def audit_one_site(tmp_path: Path, seed: int = 0, **settings: object) -> tuple[AuditBound, float]:
    """Every round of one hospital's DP-SGD with canaries, as client/app.py runs it; returns
    the bound and the epsilon its ledger claims. `seed` seeds the model and DP-SGD's noise;
    the canaries' secret is fresh each call."""
    config = RunConfig.from_mapping(
        {**FAST, "dp": True, "audit-canaries": CANARIES, "run-dir": str(tmp_path), **settings}
    )
    split = client_split(config, 0)
    audit = SiteAudit.for_node(config, {"partition-id": 0}, split)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "cleveland")
    torch.manual_seed(seed)
    arrays = build_model(task_schema(config), config).state_dict()
    for server_round in range(1, config.num_server_rounds + 1):
        model = build_model(task_schema(config), config)
        model.load_state_dict(arrays)
        with audit.round(server_round) as canaries:
            private_train(
                model, split, config, permissive_site(config, ledger),
                RoundRequest("run", server_round, None, torch.device("cpu")), canaries.for_step,
            )  # fmt: skip
        arrays = model.state_dict()
    rounds = read_audit_file(audit_file(config, split.name))["rounds"].values()
    scores = SiteScores(split.name, np.sum(list(rounds), axis=0), audit.plan.included())
    plans = [dp_sgd_steps(ledger.entries())]
    # The claim the audit tests: DP-SGD's rounds under add/remove neighbours (the permissive
    # policy's exact count makes the ledger itself account for replace-one).
    claimed = epsilon_of(plans[0], config.target_delta, config.accountant)
    return audit_bound([scores], config.target_delta, 0.95, plans), claimed


def test_without_real_noise_the_audit_proves_epsilon_at_least_4(tmp_path):
    bound, _ = audit_one_site(
        tmp_path, **{"noise-multiplier": 0.05, "accountant": "rdp", "target-epsilon": 1e7}
    )
    assert bound.epsilon_lower_bound >= 4, bound
    assert bound.method == STEINKE  # noise far below a curve worth testing


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("epsilon", [8.0, 1.0])
def test_correct_dp_sgd_stays_below_its_claim(tmp_path, epsilon, seed):
    settings = {"target-epsilon": epsilon + 0.01, "noise-multiplier": SIGMA_AT[epsilon]}
    bound, claimed = audit_one_site(tmp_path, seed, **settings)
    assert claimed == pytest.approx(epsilon, abs=0.01)
    assert bound.epsilon_lower_bound <= claimed, bound
    assert bound.method == TRADEOFF


def test_noise_cut_tenfold_behind_the_ledgers_back_is_caught(tmp_path, monkeypatch):
    honest = FlatPrivacyEngine.make_private

    def buggy(self, **kwargs):  # the optimizer noises at sigma / 10; the ledger keeps sigma
        return honest(self, **{**kwargs, "noise_multiplier": kwargs["noise_multiplier"] / 10})

    monkeypatch.setattr(FlatPrivacyEngine, "make_private", buggy)
    settings = {"target-epsilon": 1.01, "noise-multiplier": SIGMA_AT[1.0]}
    bound, claimed = audit_one_site(tmp_path, **settings)
    assert bound.epsilon_lower_bound > claimed, bound


def test_canaries_are_drawn_at_the_records_poisson_rate(tmp_path):
    config = RunConfig.from_mapping(
        {**FAST, "dp": True, "audit-canaries": 10, "run-dir": str(tmp_path),
         "noise-multiplier": 1.0, "accountant": "rdp", "target-epsilon": 1e3}
    )  # fmt: skip
    split = client_split(config, 0)
    audit = SiteAudit.for_node(config, {"partition-id": 0}, split)
    model = build_model(task_schema(config), config)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "cleveland")
    drawn = []
    original = FlatPrivacyEngine._prepare_optimizer

    def spy(self, **kwargs):
        optimizer = original(self, **kwargs)
        canaries = optimizer.canaries
        drawn.append((canaries.sample_rate, int(canaries.included.sum())))
        return optimizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlatPrivacyEngine, "_prepare_optimizer", spy)
        with audit.round(1) as canaries:
            private_train(
                model, split, config, permissive_site(config, ledger),
                RoundRequest("run", 1, None, torch.device("cpu")), canaries.for_step,
            )  # fmt: skip
    assert drawn == [(1 / 4, int(audit.plan.included().sum()))]


def test_each_step_adds_the_log_likelihood_ratio_of_included_over_excluded():
    """Along u_i the step's noised sum (less the records') is b + N(0, sigma^2) in units of C:
    the score is log((1 - q) + q exp((2x - 1) / (2 sigma^2))), summed over steps."""
    canaries = GradientCanaries(torch.eye(3)[:2], np.array([True, False]), sample_rate=0.25)
    max_grad_norm, sigma = 2.0, 0.5
    for x in ([1.2, -0.3], [0.1, 0.9]):
        canaries.observe(torch.tensor([*x, 7.0]) * max_grad_norm, max_grad_norm, sigma)
    steps = np.array([[1.2, -0.3], [0.1, 0.9]])
    expected = np.log(0.75 + 0.25 * np.exp((2 * steps - 1) / (2 * sigma**2))).sum(axis=0)
    np.testing.assert_allclose(canaries.scores.numpy(), expected, rtol=1e-6)


def test_at_sampling_rate_one_an_included_canary_is_in_every_step():
    """A site whose planned batch is above its released count samples at rate 1: the score is
    then the plain log-likelihood ratio (2x - 1) / (2 sigma^2), never log(1 - 1)."""
    canaries = GradientCanaries(torch.eye(2), np.array([True, False]), sample_rate=1.0)
    canaries.observe(torch.tensor([0.8, 0.1]), 1.0, 0.5)
    np.testing.assert_allclose(canaries.scores.numpy(), [(1.6 - 1) / 0.5, (0.2 - 1) / 0.5])
