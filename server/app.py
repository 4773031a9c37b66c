"""The ServerApp: build the global model, run the rounds, record every one of them.

Run by a real SuperLink (`confide coordinator run`) and by Flower's simulation engine
(`confide simulate`) alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.evaluation import evaluate
from common.federated_model import build_federated_model, initial_federated_state
from common.lora import load_federated_state
from common.run_config import RunConfig
from common.site_data import EncodedDataset
from common.tasks import load_central_test, task_schema
from server.federation import (
    CentralEvaluation,
    Quorum,
    await_clients,
    evaluate_round,
    run_federation,
)
from server.run_record import RunRecorder
from server.secure_aggregation import SecureAggregation
from server.strategy_choice import build_strategy
from server.strategy_state import restore_strategy_state
from server.update_validation import UpdatePolicy

log = logging.getLogger(__name__)

app = ServerApp()


def central_evaluation(config: RunConfig, test_set: EncodedDataset) -> CentralEvaluation:
    model = build_federated_model(task_schema(config), config)

    def evaluate_global(arrays: ArrayRecord) -> dict[str, float]:
        load_federated_state(model, arrays.to_torch_state_dict())
        result = evaluate(model, test_set, batch_size=256, device=torch.device("cpu"))
        return {"accuracy": result.accuracy, "loss": result.loss}

    return evaluate_global


def update_policy(config: RunConfig) -> UpdatePolicy:
    return UpdatePolicy(config.max_update_norm, config.norm_action, config.max_num_examples)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    torch.manual_seed(config.seed)
    arrays = ArrayRecord(initial_federated_state(task_schema(config), config))
    strategy = build_strategy(config)
    test_set = load_central_test(config)
    recorder = RunRecorder(Path(config.run_dir), config)
    first_round = 1
    if config.resume:  # before `try`: a run directory that cannot resume is left as it is
        point = recorder.resume()
        arrays, first_round = point.arrays, point.last_round + 1
        restore_strategy_state(strategy, point.strategy_state)
        log.info("resuming %s after round %d", config.run_dir, point.last_round)
    try:
        await_clients(grid, config.num_clients, config.min_train_replies, config.round_timeout)
        if not config.resume:
            recorder.initial(evaluate_round(grid, strategy, arrays, 0, config.round_timeout))
        run_federation(
            grid,
            strategy,
            arrays,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            policy=update_policy(config),
            on_round=recorder.round_finished,
            central_evaluation=central_evaluation(config, test_set) if test_set else None,
            first_round=first_round,
            quorum=Quorum(config.min_train_replies, config.round_retries),
            secure=(
                SecureAggregation(grid, context, config, config.min_train_replies)
                if config.secagg
                else None
            ),
        )
    except Exception as error:
        recorder.finish(error=str(error))
        raise
    recorder.finish()
