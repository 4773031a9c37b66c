"""How a task's records are dealt to virtual clients: by site, uniformly, or with Dirichlet label skew.

Every split is a pure function of (labels or sites, number of clients, seed), so each simulation worker
recomputes the same plan and no client ever needs another client's records to find its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.run_config import RunConfig
from common.site_data import EncodedDataset
from common.tasks import TASK_ROLES, load_task

MIN_RECORDS_PER_CLIENT = 2  # one to train on, one to test on
DIRICHLET_ATTEMPTS = 20


class PartitionError(ValueError):
    """A split that cannot be made (more clients than records, wrong number of sites...)."""


@dataclass(frozen=True)
class ClientSplit:
    name: str
    train: EncodedDataset
    test: EncodedDataset


def iid_partition(num_records: int, num_clients: int, seed: int) -> list[np.ndarray]:
    _check_enough_records(num_records, num_clients)
    order = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew: each class is shared out by proportions drawn from Dirichlet(alpha).

    Draws are repeated (seeded) until every client holds at least MIN_RECORDS_PER_CLIENT records.
    """
    _check_enough_records(len(labels), num_clients)
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(part) for part in merged) >= MIN_RECORDS_PER_CLIENT:
            return merged
    raise PartitionError(
        f"dirichlet-alpha={alpha} with {num_clients} clients over {len(labels)} records leaves "
        f"some client with fewer than {MIN_RECORDS_PER_CLIENT} records in {DIRICHLET_ATTEMPTS} "
        "tries; raise dirichlet-alpha or lower num-clients"
    )


def natural_partition(sites: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """One client per distinct site, in order of first appearance."""
    sites = sites.astype(str)
    _, first = np.unique(sites, return_index=True)
    names = [str(sites[i]) for i in sorted(first)]
    return names, [np.flatnonzero(sites == name) for name in names]


def split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A per-client hold-out; at least one record on each side."""
    shuffled = np.random.default_rng(seed).permutation(indices)
    num_test = min(max(1, round(len(indices) * test_fraction)), len(indices) - 1)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def _check_enough_records(num_records: int, num_clients: int) -> None:
    if num_records < num_clients * MIN_RECORDS_PER_CLIENT:
        raise PartitionError(
            f"num-clients={num_clients} needs at least {num_clients * MIN_RECORDS_PER_CLIENT} "
            f"records ({MIN_RECORDS_PER_CLIENT} each) but the task has {num_records}; "
            "lower num-clients"
        )


@lru_cache(maxsize=4)
def partition_plan(config: RunConfig) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """Client names and record indices, computed once per process for all its clients."""
    task = load_task(config)
    if config.partitioner == "natural":
        sites = task.column(config.partition_column)
        if sites is None:
            columns = ", ".join(task.rows[0]) if task.rows else "none"
            raise PartitionError(
                f"task '{config.task}' has no column '{config.partition_column}' to split by "
                f"(columns: {columns}); set partition-column, or partitioner = iid or dirichlet"
            )
        names, parts = natural_partition(sites)
        small = [
            name
            for name, part in zip(names, parts, strict=True)
            if len(part) < MIN_RECORDS_PER_CLIENT
        ]
        if small:
            raise PartitionError(
                f"site(s) {', '.join(small)} hold fewer than {MIN_RECORDS_PER_CLIENT} records "
                "(one to train on, one to test on); remove them from the file or merge them"
            )
        if len(names) != config.num_clients:
            raise PartitionError(
                f"a natural split by '{config.partition_column}' gives {len(names)} clients "
                f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); "
                f"set num-clients={len(names)}"
            )
        return tuple(names), tuple(parts)
    if config.partitioner == "iid":
        parts = iid_partition(len(task.dataset), config.num_clients, config.seed)
    else:
        parts = dirichlet_partition(
            task.dataset.labels, config.num_clients, config.dirichlet_alpha, config.seed
        )
    role = TASK_ROLES.get(config.task, "client")
    return tuple(f"{role}-{i + 1}" for i in range(len(parts))), tuple(parts)


def holdout_split(indices: np.ndarray, config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train and evaluation records. With holdout = "validation" the test records stay untouched
    and a validation share is carved out of the training records, so settings can be tuned
    without ever looking at the test sets."""
    train, test = split_train_test(indices, config.test_fraction, config.seed)
    if config.holdout == "test":
        return train, test
    return split_train_test(train, config.test_fraction, config.seed + 1)


def client_split(config: RunConfig, partition_id: int) -> ClientSplit:
    """One virtual client's train and test sets (cheap: index slices of the cached task)."""
    names, parts = partition_plan(config)
    if not 0 <= partition_id < len(parts):
        raise PartitionError(f"partition-id {partition_id} is outside 0..{len(parts) - 1}")
    train, test = holdout_split(parts[partition_id], config)
    dataset = load_task(config).dataset
    return ClientSplit(names[partition_id], dataset.subset(train), dataset.subset(test))


def site_holdout(
    count: int, test_fraction: float, holdout: str, secret: int
) -> tuple[np.ndarray, np.ndarray]:
    """A real site's train and evaluation records, each record's side decided by its own draw
    from a stream the site's secret seeds: adding a record moves no other record, and neither
    the coordinator (who never sees the secret) nor the run's seed decides which records are
    evaluated. With holdout = "validation", a share test-fraction of the training side is
    evaluated instead and the test records stay untouched."""
    draws = np.random.default_rng([secret, 0]).random(count)
    test = draws < test_fraction
    if holdout == "test":
        return np.flatnonzero(~test), np.flatnonzero(test)
    validation = ~test & (draws < test_fraction + (1 - test_fraction) * test_fraction)
    return np.flatnonzero(~test & ~validation), np.flatnonzero(validation)


def site_split(
    dataset: EncodedDataset, name: str, test_fraction: float, holdout: str, secret: int
) -> ClientSplit:
    """A real site's whole file, held out by the site's own share and secret."""
    train, test = site_holdout(len(dataset), test_fraction, holdout, secret)
    return ClientSplit(name, dataset.subset(train), dataset.subset(test))
