"""Which records this node trains on: its own file (a real site) or its share of a task (simulation)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from client.privacy.plan import SitePrivacy
from client.site_inputs import DATA_PATH_KEY
from common.atomic_file import write_atomically
from common.hf_model import hf_text_encoder
from common.partition import ClientSplit, client_split, site_split
from common.privacy_ledger import PrivacyLedger
from common.run_config import RunConfig
from common.site_data import EncodedDataset, load_site_data
from common.site_policy import SitePolicy
from common.tasks import task_schema

PARTITION_ID_KEY = "partition-id"  # set by Flower's simulation engine
NAME_KEY = "name"
LEDGER_PATH_KEY = "ledger-path"  # set by `confide join --ledger`
SECRET_MODE = 0o600


class NodeConfigError(ValueError):
    """A node started without a data file or a partition: it has nothing to train on."""


def load_local_split(
    config: RunConfig, node_config: Mapping[str, object], policy: SitePolicy
) -> ClientSplit:
    """A real site's split is its own: its policy's test share and a secret kept beside its
    ledger; a simulated client's is the rehearsal's, seeded by the run so runs repeat."""
    if DATA_PATH_KEY in node_config:
        path = Path(str(node_config[DATA_PATH_KEY]))
        name = str(node_config.get(NAME_KEY, path.stem))
        secret = split_secret(ledger_path(config, node_config, name))
        records = _load_site_file(config, path)
        return site_split(records, name, policy.test_fraction, config.holdout, secret)
    return _simulated_split(config, simulated_partition(node_config))


def simulated_partition(node_config: Mapping[str, object]) -> int:
    if PARTITION_ID_KEY not in node_config:
        raise NodeConfigError(
            f"node config has neither '{DATA_PATH_KEY}' (a site's own file) nor "
            f"'{PARTITION_ID_KEY}' (a simulated client): start the node with "
            f"--node-config '{DATA_PATH_KEY}=\"/path/to/records.csv\"'"
        )
    return int(node_config[PARTITION_ID_KEY])


def split_secret(ledger: Path) -> int:
    """The seed of the site's train/test split, drawn once and kept beside the ledger (owner
    only): the split never depends on the run's seed, which the coordinator chooses."""
    path = ledger.with_name(f"{ledger.stem}.split-secret")
    if not path.exists():
        try:
            write_atomically(
                path, f"{secrets.randbits(63)}\n".encode(), SECRET_MODE, exclusive=True
            )
        except FileExistsError:  # another process of this site drew it first: theirs stands
            pass
    return int(path.read_text(encoding="ascii"))


@lru_cache(maxsize=65536)
def _simulated_split(config: RunConfig, partition_id: int) -> ClientSplit:
    """Drawn once per worker and virtual client (its records, about the task's size in all):
    both handlers ask for it every round, 0.15 ms each."""
    return client_split(config, partition_id)


@lru_cache(maxsize=2)
def _load_site_file(config: RunConfig, path: Path) -> EncodedDataset:
    return load_site_data(
        path,
        task_schema(config),
        vocab_size=config.vocab_size,
        max_length=config.max_length,
        text_encoder=hf_text_encoder(config.model, config.max_length),
    )


def site_name(node_config: Mapping[str, object]) -> str:
    """A real site's name, known before any record is read."""
    path = Path(str(node_config.get(DATA_PATH_KEY, "site")))
    return str(node_config.get(NAME_KEY, path.stem))


def default_site_home(name: str) -> Path:
    """Where a joined site keeps its state (ledger, SuperNode work files): one folder per site,
    so two sites on one machine never share a ledger."""
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "confide" / "nodes" / name


def ledger_path(config: RunConfig, node_config: Mapping[str, object], name: str) -> Path:
    """Where this site's privacy history lives: one ledger per site, for life, so epsilon
    composes across federations; a simulated site keeps its own inside the run directory."""
    if LEDGER_PATH_KEY in node_config:
        return Path(str(node_config[LEDGER_PATH_KEY])).expanduser()
    if PARTITION_ID_KEY in node_config:
        return simulated_ledger_path(config, name)
    return default_site_home(name) / "privacy-ledger.json"


def simulated_ledger_path(config: RunConfig, name: str) -> Path:
    return Path(config.run_dir) / "privacy-ledgers" / f"{name}.json"


def site_privacy(
    config: RunConfig, node_config: Mapping[str, object], name: str, policy: SitePolicy
) -> SitePrivacy:
    """The site's ledger, keyed by the data set's name (the site's, unless its policy declares
    another): appending or editing records keeps what was spent; a new, disjoint data set gets
    a budget of its own only when the operator names it. A simulated site keeps its name across
    seeds, so a new seed does not buy a new budget either."""
    ledger = PrivacyLedger.open(ledger_path(config, node_config, name), policy.data_set_name(name))
    if DATA_PATH_KEY in node_config:
        path = Path(str(node_config[DATA_PATH_KEY]))
        source = f"{path} (sha256 {_file_sha256(path)[:16]})"
    else:
        source = f"simulated site {name} of task {config.task}"
    return SitePrivacy(policy, ledger, source, config.max_grad_norm)


@lru_cache(maxsize=2)
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
