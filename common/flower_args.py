"""`key=value` strings for Flower's `--node-config` and `--run-config` options.

Flower splits these strings with a regular expression (`flwr.common.config.parse_config_args`)
and then reads each value as TOML. A path with a space, or a value with a quote in it, is easy to
mangle on the way; building the string here, and refusing what cannot round-trip, means a site's
data path arrives exactly as typed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class FlowerArgumentError(ValueError):
    """A value Flower's key=value syntax cannot carry."""


def toml_value(key: str, value: Any) -> str:
    """One value as a TOML literal that survives Flower's splitting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FlowerArgumentError(f"{key} = {value!r}: use a finite number")
        return repr(value)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise FlowerArgumentError(f"{key}: the value contains a line break; remove it")
        if "'" not in value:
            return f"'{value}'"  # TOML literal string: no escapes, backslashes kept as typed
        if '"' not in value and "\\" not in value:
            return f'"{value}"'
        raise FlowerArgumentError(
            f"{key} = {value!r}: contains both quote characters (or a quote and a backslash); "
            "rename the file or directory"
        )
    raise FlowerArgumentError(f"{key} = {value!r}: use a string, number or true/false")


def key_values(config: Mapping[str, Any]) -> str:
    """`k1='v1' k2=3` for `--node-config` / `--run-config`."""
    parts = []
    for key, value in config.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise FlowerArgumentError(f"config key {key!r}: use letters, digits, '-' and '_'")
        parts.append(f"{key}={toml_value(key, value)}")
    return " ".join(parts)
