"""ServerApp, quickstart style: FedAvg's own `start` runs the rounds.

The only additions are for the benchmark: `evaluate_fn` (called by `start` before round 1 and after
each round) stamps the time, and the train-metrics aggregation also sums the clients' own training
seconds; both go to `timing-file` as one JSON line per round.
"""

from __future__ import annotations

import json
import math
import time

from bankbaseline.task import load_model
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    fraction_train = float(context.run_config["fraction-train"])
    fraction_evaluate = float(context.run_config["fraction-evaluate"])
    num_nodes = int(context.run_config["num-clients"])
    timing_file = str(context.run_config["timing-file"])
    train_totals: dict[str, float] = {}

    def train_metrics(records: list[RecordDict], weighting: str) -> MetricRecord:
        seconds = [float(next(iter(r.metric_records.values()))["train-seconds"]) for r in records]
        train_totals.update(clients=len(records), train_seconds=sum(seconds))
        return aggregate_metricrecords(records, weighting)

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if timing_file:
            line = {"round": server_round, "time": time.time(), **train_totals}
            with open(timing_file, "a") as handle:
                handle.write(json.dumps(line) + "\n")
        train_totals.clear()
        return None

    strategy = FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=max(2, math.floor(num_nodes * fraction_train)),
        min_evaluate_nodes=max(2, math.floor(num_nodes * fraction_evaluate)),
        min_available_nodes=num_nodes,
        train_metrics_aggr_fn=train_metrics,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(load_model(context.run_config).state_dict()),
        num_rounds=num_rounds,
        evaluate_fn=stamp,
    )
