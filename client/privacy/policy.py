"""Which privacy policy governs this node: the site's own file, never the coordinator's request.

A joined site's policy file is named in its node config (`policy-path`, written by `confide
join`), which only the site sets; a SuperNode started by hand without one gets the strict
built-in defaults. A simulated site may rehearse a policy file named in the run config
(`site-policy`), honoured only where the node config says the node is simulated.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from client.local_data import PARTITION_ID_KEY
from common.run_config import RunConfig
from common.site_policy import SitePolicy, load_policy, rehearsal_policy

POLICY_PATH_KEY = "policy-path"  # set by `confide join`


def node_policy(config: RunConfig, node_config: Mapping[str, object], name: str) -> SitePolicy:
    """Raises PolicyError for a policy file that cannot be used."""
    if PARTITION_ID_KEY in node_config:
        if config.site_policy:
            return _load(Path(config.site_policy), name)
        return rehearsal_policy(config)
    path = node_config.get(POLICY_PATH_KEY)  # read each time: the site may tighten it
    return load_policy(Path(str(path)) if path else None)


@lru_cache(maxsize=8)
def _load(path: Path, site: str) -> SitePolicy:
    """Cached: a simulation worker serves thousands of messages under one policy file."""
    return load_policy(path, site=site)
