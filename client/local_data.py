"""Which records this node trains on: its own file (a real site) or its share of a task (simulation)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from common.partition import ClientSplit, client_split, site_split
from common.privacy_ledger import PrivacyLedger, dataset_fingerprint
from common.run_config import RunConfig
from common.site_data import EncodedDataset, load_site_data
from common.tasks import task_schema

PARTITION_ID_KEY = "partition-id"  # set by Flower's simulation engine
DATA_PATH_KEY = "data-path"  # set by `confide join` on a real site
NAME_KEY = "name"
LEDGER_PATH_KEY = "ledger-path"  # set by `confide join --ledger`


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


def ledger_path(config: RunConfig, node_config: Mapping[str, object], split: ClientSplit) -> Path:
    """Where this node's privacy history lives.

    A real site keeps one ledger for life (default under the user's data directory) so epsilon
    composes across federations; a simulated client keeps its own inside the run directory.
    """
    if LEDGER_PATH_KEY in node_config:
        return Path(str(node_config[LEDGER_PATH_KEY])).expanduser()
    if PARTITION_ID_KEY in node_config:
        return Path(config.run_dir) / "privacy-ledgers" / f"{split.name}.json"
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "confide" / "privacy-ledger.json"


def open_ledger(
    config: RunConfig, node_config: Mapping[str, object], split: ClientSplit
) -> PrivacyLedger:
    """The ledger entry for this data set.

    A site's data set is its file: the fingerprint hashes the file's bytes, so a new split, seed or
    model size cannot make the same records look new. A simulated client's data set is its share.
    """
    if DATA_PATH_KEY in node_config:
        fingerprint = _file_fingerprint(Path(str(node_config[DATA_PATH_KEY])))
    else:
        parts = (split.train, split.test)
        fingerprint = dataset_fingerprint([a for p in parts for a in (*p.inputs, p.labels)])
    return PrivacyLedger.open(ledger_path(config, node_config, split), fingerprint)


@lru_cache(maxsize=2)
def _file_fingerprint(path: Path) -> str:
    return "file-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
