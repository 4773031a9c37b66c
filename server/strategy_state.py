"""The part of a strategy that lives between rounds (FedAdam's moments), as plain arrays.

Flower's FedOpt family keeps `m_t` and `v_t` on the strategy object; without them a resumed FedAdam
would restart its moments from zero and take a different, larger step than the run it continues.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import Strategy

MOMENTS = ("m_t", "v_t")


def _inner(strategy: Strategy) -> Strategy:
    """DP wrappers hold the strategy that owns the state."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    owner = _inner(strategy)
    state = {}
    for moment in MOMENTS:
        for name, array in (getattr(owner, moment, None) or {}).items():
            state[f"{moment}/{name}"] = np.ascontiguousarray(array)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    owner = _inner(strategy)
    for moment in MOMENTS:
        prefix = f"{moment}/"
        arrays = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if arrays:
            setattr(owner, moment, arrays)
