"""A site's own privacy policy: what it requires of any run and what may leave it.

The coordinator's run config only *requests* (dp on or off, a target epsilon, a noise multiplier);
the site's policy, read from the site's own disk when it joins, decides. Every check here runs
before a record is read, so a request the policy forbids costs the site nothing and is answered
in well under a second with one line naming the policy field and the request.

A policy file is TOML with kebab-case keys (all optional)::

    require-dp = true            # refuse any run that trains without DP-SGD
    max-epsilon = 3.0            # the data set's lifetime budget, across every run
    delta = 1e-6                 # default: a power of ten at most 1/(10 n)
    allow-large-delta = false    # allow a delta above 1/(10 n) (never at or above 1/n)
    accountant = "prv"           # prv | rdp
    min-noise-multiplier = 0.5   # refuse a run's fixed sigma below this
    evaluation = "private"       # private (Gaussian mechanism, charged) | off
    evaluation-share = 0.1       # share of a run's planned epsilon spent on evaluation replies
    training-metrics = "off"     # off | exact (loss and accuracy on the sampled records, unprotected)
    example-count = "private"    # private (noised once, charged) | exact (replace-one accounting)
    count-noise = 20.0           # standard deviation of the noisy record count
    tasks = ["heart"]            # tasks this site accepts (default: any)
    test-fraction = 0.34         # share of the records held out for evaluation (the site's split)
    data-set = "cohort-2024"     # the ledger's name for these records (default: the site's name)

In a simulation, `[sites.NAME]` tables override the top level for one virtual site.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.privacy import suggest_delta

EVALUATION_MODES = ("private", "off")
TRAINING_METRICS_MODES = ("off", "exact")
EXAMPLE_COUNT_MODES = ("private", "exact")
ACCOUNTANTS = ("prv", "rdp")
REFUSED = 403
"""Error code of a reply that declines (site policy, privacy budget, broken ledger); the
coordinator counts these apart from failures."""
NEIGHBOURS = {"private": "add-remove", "exact": "replace-one"}
"""The neighbour relation the accounting assumes, by how the record count leaves the site: an
exact count makes the data set's size public, which only replace-one neighbours allow."""


class RunRequest(Protocol):
    """What a run asks of a site: the fields of `common.run_config.RunConfig` checked here."""

    task: str
    dp: bool
    target_epsilon: float
    target_delta: float
    accountant: str
    noise_multiplier: float
    example_count: str
    training_metrics: str
    test_fraction: float


class PolicyError(ValueError):
    """A policy file or flag that cannot be used; the message names the file, key and fix."""


class PolicyRefusal(RuntimeError):
    """A run's request that the site's policy forbids; the message names the field and request."""


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = True
    max_epsilon: float = 3.0
    delta: float | None = None
    allow_large_delta: bool = False
    accountant: str = "prv"
    min_noise_multiplier: float = 0.5
    evaluation: str = "private"
    evaluation_share: float = 0.1
    training_metrics: str = "off"
    example_count: str = "private"
    count_noise: float = 20.0
    tasks: tuple[str, ...] = ()
    test_fraction: float = 0.34
    data_set: str = ""
    source: str = "built-in defaults"

    @property
    def neighbours(self) -> str:
        return NEIGHBOURS[self.example_count]

    def data_set_name(self, site_name: str) -> str:
        return self.data_set or site_name

    def delta_for(self, num_records: int) -> float:
        """The delta this site accounts at: its own, or a power of ten at most 1/(10 n)."""
        return self.delta if self.delta is not None else suggest_delta(num_records)

    def check_delta(self, num_records: int) -> None:
        """delta < 1/n always; delta <= 1/(10 n) unless the site explicitly allows more."""
        delta = self.delta_for(num_records)
        if delta >= 1 / num_records:
            raise PolicyRefusal(
                f"site policy ({self.source}): delta = {delta:g} is at least 1/n = "
                f"{1 / num_records:.3g} for n = {num_records} training records, which would allow "
                f"publishing a record outright; set delta to at most {suggest_delta(num_records):g}"
            )
        if delta > 1 / (10 * num_records) and not self.allow_large_delta:
            raise PolicyRefusal(
                f"site policy ({self.source}): delta = {delta:g} is above 1/(10 n) = "
                f"{1 / (10 * num_records):.3g} for n = {num_records} training records; set delta "
                f"to at most {suggest_delta(num_records):g}, or allow-large-delta = true"
            )

    def lines(self) -> list[str]:
        """What the site prints at start, so its operator sees what it enforces."""
        delta = "auto (a power of ten <= 1/(10 n))" if self.delta is None else f"{self.delta:g}"
        return [
            f"site policy from {self.source}:",
            f"  require-dp = {str(self.require_dp).lower()}, max-epsilon = {self.max_epsilon:g}, "
            f"delta = {delta}, accountant = {self.accountant}",
            f"  evaluation = {self.evaluation} (share {self.evaluation_share:g}), "
            f"training-metrics = {self.training_metrics}, example-count = {self.example_count} "
            f"({self.neighbours} neighbours)",
            f"  tasks = {', '.join(self.tasks) or 'any'}, min-noise-multiplier = "
            f"{self.min_noise_multiplier:g}, test-fraction = {self.test_fraction:g}",
        ]


FIELDS = {field.name.replace("_", "-"): field for field in dataclasses.fields(SitePolicy)}
FIELDS.pop("source")


def _problems(values: Mapping[str, Any], where: str) -> list[str]:
    """Every problem at once, each naming the key and what would be accepted."""
    problems = []
    for key in sorted(set(values) - set(FIELDS)):
        problems.append(f"{where}: unknown key '{key}'; valid keys: {', '.join(FIELDS)}")
    expected_types: dict[str, tuple[type, ...]] = {
        "require-dp": (bool,),
        "allow-large-delta": (bool,),
        "max-epsilon": (int, float),
        "delta": (int, float),
        "min-noise-multiplier": (int, float),
        "evaluation-share": (int, float),
        "count-noise": (int, float),
        "test-fraction": (int, float),
        "accountant": (str,),
        "evaluation": (str,),
        "training-metrics": (str,),
        "example-count": (str,),
        "data-set": (str,),
        "tasks": (list,),
    }
    for key, value in values.items():
        types = expected_types.get(key)
        if types and (not isinstance(value, types) or (bool not in types and type(value) is bool)):
            names = " or ".join("number" if t in (int, float) else t.__name__ for t in types)
            problems.append(
                f"{where}: '{key}' = {value!r} is a {type(value).__name__}; use a {names}"
            )
    if problems:
        return problems
    ranges = [
        ("max-epsilon", lambda v: math.isfinite(v) and v > 0, "a finite number > 0, e.g. 3.0"),
        ("delta", lambda v: 0 < v < 1, "a number in (0, 1/(10 n)), e.g. 1e-6"),
        ("min-noise-multiplier", lambda v: math.isfinite(v) and v > 0, "a number > 0, e.g. 0.5"),
        ("evaluation-share", lambda v: 0 < v < 1, "a number in (0, 1), e.g. 0.1"),
        ("count-noise", lambda v: math.isfinite(v) and v > 0, "a number > 0, e.g. 20"),
        ("test-fraction", lambda v: 0 < v < 1, "a number in (0, 1), e.g. 0.34"),
        ("accountant", lambda v: v in ACCOUNTANTS, f"one of {', '.join(ACCOUNTANTS)}"),
        ("evaluation", lambda v: v in EVALUATION_MODES, f"one of {', '.join(EVALUATION_MODES)}"),
        (
            "training-metrics",
            lambda v: v in TRAINING_METRICS_MODES,
            f"one of {', '.join(TRAINING_METRICS_MODES)}",
        ),
        (
            "example-count",
            lambda v: v in EXAMPLE_COUNT_MODES,
            f"one of {', '.join(EXAMPLE_COUNT_MODES)}",
        ),
        ("tasks", lambda v: all(isinstance(t, str) for t in v), "a list of task names"),
    ]
    for key, ok, expected in ranges:
        if key in values and not ok(values[key]):
            problems.append(f"{where}: '{key}' = {values[key]!r} is invalid; use {expected}")
    return problems


def policy_from_mapping(values: Mapping[str, Any], source: str) -> SitePolicy:
    """A checked policy; PolicyError lists every problem, each naming `source` and the key."""
    problems = _problems(values, source)
    if problems:
        raise PolicyError("; ".join(problems))
    kwargs: dict[str, Any] = {FIELDS[key].name: value for key, value in values.items()}
    numbers = "max_epsilon delta min_noise_multiplier evaluation_share count_noise test_fraction"
    for key in numbers.split():
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    if "tasks" in kwargs:
        kwargs["tasks"] = tuple(kwargs["tasks"])
    return SitePolicy(**kwargs, source=source)


def read_policy_table(path: Path) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file; check the path") from None
    except OSError as error:
        raise PolicyError(
            f"{path}: cannot be read ({error.strerror}); check its permissions"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: not valid TOML ({error}); fix the file") from None


def load_policy(
    path: Path | None, overrides: Mapping[str, Any] | None = None, site: str | None = None
) -> SitePolicy:
    """The policy in `path` (None: the built-in defaults), `[sites.SITE]` applied for a simulated
    site, then `overrides` (a joining site's flags) on top."""
    table = read_policy_table(path) if path is not None else {}
    sites = table.pop("sites", {})
    source = str(path) if path is not None else "built-in defaults"
    if not isinstance(sites, dict) or not all(isinstance(v, dict) for v in sites.values()):
        raise PolicyError(f"{source}: 'sites' must hold one table per site, [sites.NAME]")
    values = dict(table)
    if site is not None and site in sites:
        values.update(sites[site])
        source = f"{source} [sites.{site}]"
    for name, override in sites.items():  # check every site's table, not only the one in use
        policy_from_mapping({**table, **override}, f"{source.split(' [')[0]} [sites.{name}]")
    values.update(overrides or {})
    if overrides:
        source = f"{source} with command-line flags" if path is not None else "command-line flags"
    return policy_from_mapping(values, source)


def rehearsal_policy(request: RunRequest) -> SitePolicy:
    """A simulation without a policy file: each virtual site accepts what the run asks for (DP or
    not, its budget, the disclosures it requests), and otherwise keeps a joined site's defaults."""
    return SitePolicy(
        require_dp=request.dp,
        max_epsilon=request.target_epsilon,
        delta=request.target_delta,
        accountant=request.accountant,
        training_metrics=request.training_metrics,
        example_count=request.example_count,
        test_fraction=request.test_fraction,
        source="the run config (a rehearsal: no site policy given)",
    )


def check_request(policy: SitePolicy, request: RunRequest) -> None:
    """Refuse a run that asks for less privacy than the policy allows; cheap, before any data."""

    def refuse(field: str, asked: str) -> PolicyRefusal:
        return PolicyRefusal(f"refused by site policy ({policy.source}): {field}, but {asked}")

    if policy.tasks and request.task not in policy.tasks:
        raise refuse(f"tasks = {list(policy.tasks)}", f"the run is task {request.task!r}")
    if not request.dp:
        if policy.require_dp:
            raise refuse("require-dp = true", "the run asks dp = false")
        return
    if request.target_epsilon > policy.max_epsilon:
        raise refuse(
            f"max-epsilon = {policy.max_epsilon:g}",
            f"the run asks target-epsilon = {request.target_epsilon:g}",
        )
    if 0 < request.noise_multiplier < policy.min_noise_multiplier:
        raise refuse(
            f"min-noise-multiplier = {policy.min_noise_multiplier:g}",
            f"the run asks noise-multiplier = {request.noise_multiplier:g}",
        )
    if request.example_count == "exact" and policy.example_count != "exact":
        raise refuse(
            f"example-count = {policy.example_count!r}", "the run asks example-count = 'exact'"
        )
    if request.training_metrics == "exact" and policy.training_metrics != "exact":
        raise refuse(
            f"training-metrics = {policy.training_metrics!r}",
            "the run asks training-metrics = 'exact'",
        )


def policy_toml(policy: SitePolicy) -> str:
    """The policy as the TOML file a joined site's ClientApp reads (every field spelled out)."""
    lines = [f"# {policy.source}"]
    for key, field in FIELDS.items():
        value = getattr(policy, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, str):
            text = json.dumps(value)
        elif isinstance(value, tuple):
            text = json.dumps(list(value))
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
