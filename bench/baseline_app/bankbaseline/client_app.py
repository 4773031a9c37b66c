"""ClientApp, quickstart style: each handler loads its data, builds the model, trains, replies.

With `noop` the handlers reply at once (the received weights back, no data, no model, no training):
what Flower's simulation engine itself costs per client-round, the floor under any ClientApp."""

from __future__ import annotations

from bankbaseline.task import load_data, load_model, loader, test
from bankbaseline.task import train as train_fn
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if context.run_config["noop"]:
        metrics = MetricRecord({"train-seconds": 0.0, "num-examples": 1})
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": metrics})
        return Message(content=content, reply_to=msg)
    model = load_model(context.run_config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainset, _ = load_data(partition_id, num_partitions, context.run_config)
    trainloader = loader(trainset, int(context.run_config["batch-size"]), shuffle=True)
    train_loss, seconds = train_fn(
        model,
        trainloader,
        int(context.run_config["local-epochs"]),
        float(context.run_config["learning-rate"]),
        float(context.run_config["weight-decay"]),
    )
    metrics = {"train_loss": train_loss, "train-seconds": seconds, "num-examples": len(trainset)}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if context.run_config["noop"]:
        metrics = MetricRecord({"eval_loss": 0.0, "eval_acc": 0.0, "num-examples": 1})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
    model = load_model(context.run_config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, testset = load_data(partition_id, num_partitions, context.run_config)
    eval_loss, eval_acc = test(model, loader(testset, 256, shuffle=False))
    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(testset)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
