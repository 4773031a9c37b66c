"""Specifications for common.partition: iid, Dirichlet and natural splits, hold-outs, client splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.partition import (
    MIN_RECORDS_PER_CLIENT,
    PartitionError,
    client_split,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition_plan,
    split_train_test,
)
from common.run_config import RunConfig

# 10 classes of uneven size, so a skew measure cannot be fooled by perfectly balanced labels.
LABELS = np.repeat(np.arange(10), [60, 70, 80, 90, 100, 110, 120, 130, 140, 150])


def assert_disjoint_and_covering(parts: list[np.ndarray], num_records: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == num_records, "some record is dealt twice or not at all"
    assert np.array_equal(np.sort(merged), np.arange(num_records))


def mean_max_class_share(labels: np.ndarray, alpha: float, seeds: range) -> float:
    """How dominated each client is by its biggest class, averaged over clients and seeds."""
    shares = []
    for seed in seeds:
        for part in dirichlet_partition(labels, 10, alpha, seed):
            counts = np.bincount(labels[part])
            shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


# ------------------------------------------------------------------------------------- iid


def test_iid_parts_are_disjoint_and_cover_every_record() -> None:
    assert_disjoint_and_covering(iid_partition(103, 7, seed=0), 103)


def test_iid_part_sizes_differ_by_at_most_one() -> None:
    sizes = [len(part) for part in iid_partition(103, 7, seed=0)]
    assert len(sizes) == 7
    assert max(sizes) - min(sizes) <= 1


def test_iid_part_indices_are_sorted() -> None:
    for part in iid_partition(50, 3, seed=1):
        assert np.array_equal(part, np.sort(part))


def test_iid_is_deterministic_per_seed() -> None:
    first, second = iid_partition(200, 5, seed=42), iid_partition(200, 5, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_differs_across_seeds() -> None:
    first, second = iid_partition(200, 5, seed=0), iid_partition(200, 5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_with_exactly_min_records_per_client_succeeds() -> None:
    parts = iid_partition(4 * MIN_RECORDS_PER_CLIENT, 4, seed=0)
    assert [len(p) for p in parts] == [MIN_RECORDS_PER_CLIENT] * 4


def test_more_clients_than_records_allow_is_a_partition_error_naming_num_clients() -> None:
    with pytest.raises(PartitionError, match="num-clients=5") as info:
        iid_partition(5 * MIN_RECORDS_PER_CLIENT - 1, 5, seed=0)
    assert "lower num-clients" in str(info.value)


def test_dirichlet_with_too_few_records_is_a_partition_error() -> None:
    with pytest.raises(PartitionError, match="num-clients=10"):
        dirichlet_partition(np.zeros(3, dtype=np.int64), 10, alpha=1.0, seed=0)


# ------------------------------------------------------------------------------- dirichlet


@pytest.mark.parametrize("alpha", [0.3, 1.0, 100.0])
def test_dirichlet_parts_are_disjoint_and_cover_every_record(alpha: float) -> None:
    assert_disjoint_and_covering(dirichlet_partition(LABELS, 10, alpha, seed=0), len(LABELS))


@pytest.mark.parametrize("seed", range(5))
def test_every_dirichlet_client_gets_at_least_the_minimum(seed: int) -> None:
    parts = dirichlet_partition(LABELS, 10, alpha=0.1, seed=seed)
    assert len(parts) == 10
    assert min(len(p) for p in parts) >= MIN_RECORDS_PER_CLIENT


def test_dirichlet_is_deterministic_per_seed() -> None:
    first = dirichlet_partition(LABELS, 6, alpha=0.5, seed=3)
    second = dirichlet_partition(LABELS, 6, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_dirichlet_differs_across_seeds() -> None:
    first = dirichlet_partition(LABELS, 6, alpha=0.5, seed=0)
    second = dirichlet_partition(LABELS, 6, alpha=0.5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_smaller_dirichlet_alpha_gives_more_label_skew() -> None:
    seeds = range(4)
    skewed = mean_max_class_share(LABELS, 0.1, seeds)
    moderate = mean_max_class_share(LABELS, 1.0, seeds)
    near_iid = mean_max_class_share(LABELS, 100.0, seeds)
    assert skewed > moderate + 0.1
    assert moderate > near_iid + 0.05
    # With a huge alpha every client looks like the whole set (largest class: 150 of 1050).
    assert near_iid == pytest.approx(150 / len(LABELS), abs=0.05)


def test_impossible_dirichlet_split_names_dirichlet_alpha() -> None:
    # 40 records would fit 20 clients of 2, but a tiny alpha leaves most clients empty.
    labels = np.repeat([0, 1], 20)
    with pytest.raises(PartitionError) as info:
        dirichlet_partition(labels, 20, alpha=0.01, seed=0)
    message = str(info.value)
    assert "dirichlet-alpha=0.01" in message
    assert "raise dirichlet-alpha" in message


# --------------------------------------------------------------------------------- natural


def test_natural_partition_has_one_client_per_site_in_order_of_first_appearance() -> None:
    sites = np.array(["zurich", "basel", "zurich", "bern", "basel", "zurich"])
    names, parts = natural_partition(sites)
    assert names == ["zurich", "basel", "bern"]
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [3]]


def test_natural_partition_is_disjoint_and_covering() -> None:
    sites = np.array(list("abcabcaab"))
    _, parts = natural_partition(sites)
    assert_disjoint_and_covering(parts, len(sites))


# ------------------------------------------------------------------------------- hold-outs


def test_split_train_test_is_disjoint_and_covers_the_client() -> None:
    indices = np.arange(100, 160)
    train, test = split_train_test(indices, 0.25, seed=0)
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    assert len(test) == 15


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_split_train_test_keeps_one_record_on_each_side_of_a_pair(fraction: float) -> None:
    train, test = split_train_test(np.array([7, 9]), fraction, seed=0)
    assert len(train) == 1
    assert len(test) == 1


def test_split_train_test_keeps_a_test_record_for_a_tiny_fraction() -> None:
    train, test = split_train_test(np.arange(10), 0.001, seed=0)
    assert (len(train), len(test)) == (9, 1)


def test_split_train_test_keeps_a_train_record_for_a_huge_fraction() -> None:
    train, test = split_train_test(np.arange(10), 0.999, seed=0)
    assert (len(train), len(test)) == (1, 9)


def test_split_train_test_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    indices = np.arange(50)
    a_train, _ = split_train_test(indices, 0.3, seed=5)
    b_train, _ = split_train_test(indices, 0.3, seed=5)
    c_train, _ = split_train_test(indices, 0.3, seed=6)
    assert np.array_equal(a_train, b_train)
    assert not np.array_equal(a_train, c_train)


# --------------------------------------------------------------------- plans and client splits

HEART_FLAMBY_ROWS = {"cleveland": 303, "hungary": 261, "switzerland": 46, "va-long-beach": 130}


@pytest.fixture(scope="module")
def heart_config() -> RunConfig:
    return RunConfig.from_mapping({"task": "heart", "partitioner": "natural", "num-clients": 4})


def test_heart_client_splits_are_the_four_flamby_hospitals(heart_config: RunConfig) -> None:
    splits = [client_split(heart_config, i) for i in range(4)]
    assert {s.name: len(s.train) + len(s.test) for s in splits} == HEART_FLAMBY_ROWS
    assert [s.name for s in splits] == list(HEART_FLAMBY_ROWS)


def test_heart_client_hold_out_follows_test_fraction(heart_config: RunConfig) -> None:
    split = client_split(heart_config, 0)
    assert len(split.test) == round(303 * heart_config.test_fraction)


def write_custom_task(directory: Path, sites: list[str]) -> RunConfig:
    """A custom task whose numeric column `record` holds each row's number, to trace records."""
    data = directory / "records.csv"
    lines = ["record,site,outcome"]
    lines += [f"{i},{site},{'yes' if i % 2 else 'no'}" for i, site in enumerate(sites)]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    schema = directory / "schema.toml"
    schema.write_text(
        'label = "outcome"\nclasses = ["no", "yes"]\n[numeric.record]\ncenter = 0.0\nscale = 1.0\n',
        encoding="utf-8",
    )
    return RunConfig.from_mapping(
        {
            "task": "custom",
            "data-file": str(data),
            "schema-file": str(schema),
            "partitioner": "natural",
            "partition-column": "site",
            "num-clients": len(set(sites)),
        }
    )


def test_client_split_holds_out_records_of_its_own_site_only(tmp_path: Path) -> None:
    sites = ["north", "south", "north", "east", "south", "north"] * 5
    config = write_custom_task(tmp_path, sites)
    for partition_id, site in enumerate(["north", "south", "east"]):
        split = client_split(config, partition_id)
        train = set(split.train.inputs[0][:, 0].astype(int).tolist())
        test = set(split.test.inputs[0][:, 0].astype(int).tolist())
        assert split.name == site
        assert not train & test
        assert train | test == {i for i, s in enumerate(sites) if s == site}


def test_partition_id_outside_the_plan_is_a_partition_error(heart_config: RunConfig) -> None:
    with pytest.raises(PartitionError, match=r"0\.\.3"):
        client_split(heart_config, 4)


def test_natural_split_with_wrong_num_clients_says_what_to_set() -> None:
    config = RunConfig.from_mapping({"task": "heart", "partitioner": "natural", "num-clients": 3})
    with pytest.raises(PartitionError) as info:
        partition_plan(config)
    message = str(info.value)
    assert "set num-clients=4" in message
    assert "cleveland" in message


def test_iid_plan_names_clients_by_the_task_role() -> None:
    config = RunConfig.from_mapping({"task": "heart", "partitioner": "iid", "num-clients": 3})
    names, parts = partition_plan(config)
    assert names == ("hospital-1", "hospital-2", "hospital-3")
    assert_disjoint_and_covering(list(parts), 740)


def test_dirichlet_plan_over_heart_gives_every_client_a_train_and_test_record() -> None:
    config = RunConfig.from_mapping(
        {"task": "heart", "partitioner": "dirichlet", "num-clients": 8, "dirichlet-alpha": 0.3}
    )
    for partition_id in range(8):
        split = client_split(config, partition_id)
        assert len(split.train) >= 1
        assert len(split.test) >= 1
