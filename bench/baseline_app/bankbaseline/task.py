"""Model, data and training loop, quickstart style: everything a handler needs, nothing cached."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.model_factory import build_model
from common.partition import dirichlet_partition, split_train_test
from common.run_config import RunConfig
from common.site_data import EncodedDataset, encode_rows, read_table
from common.tasks import DATA_DIR, task_schema

BANK_CSV = DATA_DIR / "uci_bank_marketing" / "bank-full.csv.gz"
_CACHE: dict[tuple, tuple[EncodedDataset, list]] = {}  # cache-data: encoded data + split


def model_config(run_config) -> RunConfig:
    """Confide's model settings for the bank task (width 32, depth 2, 4 heads: the defaults)."""
    return RunConfig.from_mapping({"task": "bank", "seed": int(run_config["seed"])})


def load_model(run_config) -> torch.nn.Module:
    config = model_config(run_config)
    return build_model(task_schema(config), config)


def load_data(partition_id: int, num_partitions: int, run_config):
    """Read the CSV, encode it, split it: Dirichlet label skew, then a per-client hold-out.

    With cache-data the encoded records and the split are kept per worker process, as the real
    quickstart keeps its `FederatedDataset` in a global; each call still slices its partition.
    """
    seed = int(run_config["seed"])
    alpha = float(run_config["dirichlet-alpha"])
    key = (num_partitions, alpha, seed)
    if run_config["cache-data"] and key in _CACHE:
        dataset, parts = _CACHE[key]
    else:
        schema = task_schema(model_config(run_config))
        rows = read_table(BANK_CSV)
        ignore = set(rows[0]) - set(schema.columns())
        dataset = encode_rows(rows, schema, BANK_CSV.name, ignore=ignore)
        parts = dirichlet_partition(dataset.labels, num_partitions, alpha, seed)
        if run_config["cache-data"]:
            _CACHE[key] = dataset, parts
    train, test = split_train_test(parts[partition_id], float(run_config["test-fraction"]), seed)
    return dataset.subset(train), dataset.subset(test)


def loader(dataset: EncodedDataset, batch_size: int, shuffle: bool) -> DataLoader:
    tensors = [torch.from_numpy(a) for a in (*dataset.inputs, dataset.labels)]
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


def train(model, trainloader, epochs: int, lr: float, weight_decay: float):
    started = time.perf_counter()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    running_loss, seen = 0.0, 0
    for _ in range(epochs):
        for *inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(*inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(labels)
            seen += len(labels)
    return running_loss / max(seen, 1), time.perf_counter() - started


@torch.no_grad()
def test(model, testloader):
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for *inputs, labels in testloader:
        logits = model(*inputs)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss / max(count, 1), correct / max(count, 1)
