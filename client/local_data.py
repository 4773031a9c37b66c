"""Which records this node trains on: its own file (a real site) or its share of a task (simulation)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from common.partition import ClientSplit, client_split, site_split
from common.run_config import RunConfig
from common.site_data import EncodedDataset, load_site_data
from common.tasks import task_schema

PARTITION_ID_KEY = "partition-id"  # set by Flower's simulation engine
DATA_PATH_KEY = "data-path"  # set by `confide join` on a real site
NAME_KEY = "name"


def load_local_split(config: RunConfig, node_config: Mapping[str, object]) -> ClientSplit:
    if DATA_PATH_KEY in node_config:
        path = Path(str(node_config[DATA_PATH_KEY]))
        name = str(node_config.get(NAME_KEY, path.stem))
        return site_split(config, _load_site_file(config, path), name)
    if PARTITION_ID_KEY in node_config:
        return client_split(config, int(node_config[PARTITION_ID_KEY]))
    raise ValueError(
        f"node config has neither '{DATA_PATH_KEY}' (a site's own file) nor "
        f"'{PARTITION_ID_KEY}' (a simulated client): start the node with "
        f"--node-config '{DATA_PATH_KEY}=\"/path/to/records.csv\"'"
    )


@lru_cache(maxsize=2)
def _load_site_file(config: RunConfig, path: Path) -> EncodedDataset:
    return load_site_data(
        path, task_schema(config), vocab_size=config.vocab_size, max_length=config.max_length
    )
