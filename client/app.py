"""The ClientApp: turn Flower messages into local training and evaluation, and back.

The same app runs on a hospital's SuperNode and inside Flower's simulation engine; only the node
config differs (a data file there, a partition id here).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local_data import load_local_split
from client.training import choose_device, train_epochs
from common.evaluation import evaluate, make_loader
from common.model_factory import build_model
from common.run_config import RunConfig
from common.tasks import task_schema

EVALUATION_BATCH_SIZE = 256

app = ClientApp()


def _received_model(msg: Message, config: RunConfig) -> torch.nn.Module:
    model = build_model(task_schema(config), config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    split = load_local_split(config, context.node_config)
    model = _received_model(msg, config)
    server_round = int(msg.content["config"].get("server-round", 0))
    loader = make_loader(
        split.train, config.batch_size, shuffle=True, seed=config.seed + server_round
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    result = train_epochs(
        model,
        loader,
        optimizer,
        config.local_epochs,
        choose_device(),
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "train-seconds": result.seconds,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": metrics,
            "client": ConfigRecord({"name": split.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global_model(msg: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    split = load_local_split(config, context.node_config)
    model = _received_model(msg, config)
    result = evaluate(model, split.test, EVALUATION_BATCH_SIZE, choose_device())
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy}
    )
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"name": split.name})})
    return Message(content=content, reply_to=msg)
