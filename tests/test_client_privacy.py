"""DP-SGD inside the real ClientApp: budgets are enforced per data set, refusals are reported, and
the ledger's history is the accountant's truth. Real Opacus throughout."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader, TensorDataset

from client.app import app as client_app
from client.local_data import load_local_split
from client.privacy.optimizer import FlatPrivacyEngine
from client.privacy.plan import SitePrivacy
from client.privacy.site import RoundRequest, private_train
from client.privacy.training import freeze_token_table, noise_only_step, opacus_mode
from common.model_factory import build_model
from common.privacy import epsilon_of
from common.privacy_ledger import PrivacyLedger
from common.run_config import RunConfig
from common.site_policy import SitePolicy
from common.tasks import task_schema
from server.app import update_policy
from server.federation import evaluate_round, run_round
from server.federation_error import FederationError
from server.strategy_choice import build_strategy
from tests.local_grid import LocalGrid


def dp_config(tmp_path, **overrides) -> RunConfig:
    settings = {
        "dp": True,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "batch-size": 30,  # switzerland, the smallest hospital, has 30 training records
        "run-dir": str(tmp_path),
        **overrides,
    }
    return RunConfig.from_mapping(settings)


def hospitals(**extra_by_partition) -> dict[int, dict]:
    return {
        10 + i: {"partition-id": i, "num-partitions": 4, **extra_by_partition.get(str(i), {})}
        for i in range(4)
    }


def run_rounds(config: RunConfig, nodes: dict[int, dict], rounds: int):
    grid = LocalGrid(client_app, config.to_mapping(), nodes)
    strategy = build_strategy(config)
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    records = []
    for server_round in range(1, rounds + 1):
        arrays, record = run_round(
            grid, strategy, arrays, server_round, timeout=60, policy=update_policy(config)
        )
        records.append(record)
    return records


def test_calibrated_noise_keeps_every_client_within_its_budget(tmp_path):
    config = dp_config(tmp_path, **{"target-epsilon": 2.0})
    records = run_rounds(config, hospitals(), rounds=3)
    final = records[-1].as_json()
    assert len(final["clients"]) == 4
    for client in final["clients"]:
        assert client["delta"] == 1e-5
        assert 1.5 < client["epsilon"] <= 2.0  # calibrated to spend, not to waste, the budget
    assert final["epsilon_max"] == max(c["epsilon"] for c in final["clients"])


def test_the_ledger_history_reproduces_the_reported_epsilon(tmp_path):
    config = dp_config(tmp_path)
    records = run_rounds(config, hospitals(), rounds=2)
    ledger_file = tmp_path / "privacy-ledgers" / "cleveland.json"
    ledger = PrivacyLedger.open(ledger_file, "cleveland")  # keyed by the site's name
    entries = ledger.entries()
    assert [e.server_round for e in entries if e.purpose == "train"] == [1, 2]
    assert [e.purpose for e in entries].count("count") == 1  # released once, then repeated
    assert [e.purpose for e in entries].count("evaluate") == 2
    last_train = max(i for i, e in enumerate(entries) if e.purpose == "train")
    reported = next(c for c in records[-1].clients if c["name"] == "cleveland")["epsilon"]
    history = [e.history_entry for e in entries[: last_train + 1]]
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(reported, rel=1e-9)


def test_a_fixed_sigma_whose_plan_overspends_the_site_is_refused_before_any_charge(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("max-epsilon = 8.0\n[sites.switzerland]\nmax-epsilon = 2.0\n")
    config = dp_config(
        tmp_path,
        **{"noise-multiplier": 1.0, "num-server-rounds": 5, "target-epsilon": 2.0},
        **{"site-policy": str(policy)},
    )
    (record,) = run_rounds(config, hospitals(), rounds=1)
    (refusal,) = [f for f in record.failures if f["stage"] == "train"]
    assert refusal["reason"].startswith("switzerland: refused by site policy")
    assert "noise-multiplier = 1 would spend epsilon" in refusal["reason"]
    assert refusal["refused"] is True
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledgers" / "switzerland.json", "switzerland")
    assert [e.purpose for e in ledger.entries()] == ["count"]  # what the plan is computed from


def test_a_site_past_its_budget_stops_training_and_answering_evaluation(tmp_path):
    """A coordinator that asks for more than it planned meets the ledger, not the plan."""
    config = dp_config(tmp_path, **{"num-server-rounds": 1, "target-epsilon": 1.0})
    grid = LocalGrid(client_app, config.to_mapping(), hospitals())
    strategy = build_strategy(config)
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    run_round(grid, strategy, arrays, 1, timeout=60, policy=update_policy(config))
    with pytest.raises(FederationError, match="privacy budget exhausted"):
        run_round(grid, strategy, arrays, 2, timeout=60, policy=update_policy(config))
    answered = [evaluate_round(grid, strategy, arrays, r, timeout=60) for r in (2, 3)]
    refused = answered[-1].failures  # the planned evaluations are spent by now
    assert len(refused) == 4 and all(f["refused"] for f in refused)
    assert all("exhausted" in f["reason"] or "are spent" in f["reason"] for f in refused)
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledgers" / "cleveland.json", "cleveland")
    assert ledger.epsilon_spent(1e-5, "prv") <= 1.0


def test_a_tampered_ledger_means_no_training_and_no_reset(tmp_path):
    config = dp_config(tmp_path)
    run_rounds(config, hospitals(), rounds=1)
    ledger_file = tmp_path / "privacy-ledgers" / "hungary.json"
    tampered = ledger_file.read_text().replace('"steps": ', '"steps": 1', 1)
    ledger_file.write_text(tampered)
    grid_config = dp_config(tmp_path)
    grid = LocalGrid(client_app, grid_config.to_mapping(), hospitals())
    arrays = ArrayRecord(build_model(task_schema(config), config).state_dict())
    _, record = run_round(
        grid, build_strategy(config), arrays, 2, timeout=60, policy=update_policy(config)
    )
    (failure,) = [f for f in record.failures if f["stage"] == "train"]
    assert failure["reason"].startswith("hungary:") and "refusing to train" in failure["reason"]
    assert ledger_file.read_text() == tampered  # never reset


def test_when_every_site_refuses_the_run_stops_with_the_reason(tmp_path):
    config = dp_config(tmp_path, **{"noise-multiplier": 0.5, "target-epsilon": 0.5})
    with pytest.raises(FederationError, match="would spend epsilon"):
        run_rounds(config, hospitals(), rounds=1)


def test_a_batch_larger_than_a_sites_data_samples_every_record_and_says_nothing_of_its_size(
    tmp_path,
):
    """A refusal naming the site's record count would publish it: the site trains at sampling
    rate 1 instead (every step sees every record), which its accounting covers."""
    config = dp_config(tmp_path, **{"batch-size": 64})  # switzerland has 30 training records
    (record,) = run_rounds(config, hospitals(), rounds=1)
    assert not [f for f in record.failures if f["stage"] == "train"]
    ledger = PrivacyLedger.open(tmp_path / "privacy-ledgers" / "switzerland.json", "switzerland")
    (train,) = [e for e in ledger.entries() if e.purpose == "train"]
    assert (train.sample_rate, train.steps) == (1.0, 1)  # the noisy count is below 64 too


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_an_empty_poisson_batch_still_takes_a_step_of_pure_noise(mode):
    """Skipping it would let the released model reveal that no record was drawn."""
    moved = {}
    for sigma in (0.0, 1.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
        wrapped = FlatPrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(data, batch_size=8),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
        before = [p.detach().clone() for p in wrapped[0].parameters()]
        noise_only_step(wrapped[0], wrapped[1])
        after = list(wrapped[0].parameters())
        moved[sigma] = max((a - b).abs().max().item() for a, b in zip(after, before, strict=True))
        assert all(torch.isfinite(p).all() for p in after)
    assert moved[0.0] == 0.0 and moved[1.0] > 0.0


def test_auto_is_expanded_weights_and_a_chosen_mode_is_kept():
    assert opacus_mode(RunConfig.from_mapping({"task": "banking77"})) == "ew"
    assert opacus_mode(RunConfig.from_mapping({"dp-mode": "functorch"})) == "functorch"


@pytest.mark.parametrize(("setting", "trains_token_table"), [("frozen", False), ("trained", True)])
def test_under_dp_the_text_models_token_table_is_frozen_unless_asked(setting, trains_token_table):
    config = RunConfig.from_mapping({"task": "banking77", "dp-token-embedding": setting})
    model = build_model(task_schema(config), config)
    freeze_token_table(model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ("token.weight" in trainable) is trains_token_table
    assert "position.weight" in trainable and "head.weight" in trainable


def test_sampling_and_noise_cannot_be_replayed_from_the_run_seed(tmp_path):
    """The coordinator knows the run's seed and torch's default generator starts from a fixed
    one; a DP round drawn from either could be replayed, the noise subtracted."""
    config = dp_config(tmp_path, **{"noise-multiplier": 1.0, "target-epsilon": 10.0})
    node = {"partition-id": 0, "num-partitions": 4}
    split = load_local_split(config, node, SitePolicy())
    weights = []
    for attempt in range(2):
        torch.manual_seed(0)  # the same process state both times
        model = build_model(task_schema(config), config)
        ledger = PrivacyLedger.open(tmp_path / f"ledger-{attempt}.json", "fingerprint")
        site = SitePrivacy(SitePolicy(max_epsilon=10.0), ledger, "test", config.max_grad_norm)
        request = RoundRequest("run", 1, None, torch.device("cpu"))
        private_train(model, split, config, site, request)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(*weights)
