"""The neighbouring-world harness: one hostile message, two neighbouring data sets, one coupling.

DP promises that what leaves a site is nearly the same function of two data sets that differ in
one record. Tested as the proof goes: the real ClientApp answers the same message on a site
holding D and on one holding D' (a record added, removed or replaced). In world D the release
gate's randomness (client/privacy/gate.py: the noise, and the secret that seeds Poisson
sampling) is drawn and recorded; in world D' the gate is handed the same secrets and, for each
release, exactly the value D released. Under that coupling a correct site sends byte-identical
replies, and the exact value each world fed each release differs by at most the mechanism's
sensitivity (twice it, for a replaced record). Anything else that reached the reply from the
records (a count in an error, a key, a NaN, a scale computed from n) shows up as a difference.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as client_app_module
from client.privacy import gate
from client.privacy.gate import EntropyNoise, NoiseSource
from client.privacy.plan import SitePrivacy
from common.privacy_ledger import LedgerEntry, PrivacyLedger
from common.site_policy import load_policy

NODE = 7
SPLIT_SECRET = 2024
NEIGHBOURS = ("add", "remove", "replace")


@dataclass
class Release:
    mechanism: str
    exact: torch.Tensor
    std: float
    sensitivity: float
    released: torch.Tensor


@dataclass
class RecordingNoise:
    """World D: real randomness, every release and secret kept."""

    releases: list[Release] = field(default_factory=list)
    secrets: list[int] = field(default_factory=list)
    _entropy: EntropyNoise = field(default_factory=EntropyNoise)

    def release(
        self, mechanism: str, exact: torch.Tensor, std: float, sensitivity: float
    ) -> torch.Tensor:
        released = self._entropy.release(mechanism, exact, std, sensitivity)
        self.releases.append(
            Release(mechanism, exact.detach().cpu().clone(), std, sensitivity, released.cpu())
        )
        return released

    def secret(self) -> int:
        self.secrets.append(self._entropy.secret())
        return self.secrets[-1]


@dataclass
class CoupledNoise:
    """World D': D's secrets, and D's released value for each release; the exact values fed in
    are kept, and any release D did not make is a difference."""

    recorded: RecordingNoise
    exact: list[torch.Tensor] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    _secrets: int = 0

    def release(
        self, mechanism: str, exact: torch.Tensor, std: float, sensitivity: float
    ) -> torch.Tensor:
        index = len(self.exact)
        self.exact.append(exact.detach().cpu().clone())
        if index >= len(self.recorded.releases):
            self.differences.append(f"release {index} ({mechanism}) made in D' only")
            return exact
        twin = self.recorded.releases[index]
        if (twin.mechanism, twin.std, twin.sensitivity, twin.exact.shape) != (
            mechanism, std, sensitivity, exact.shape,
        ):  # fmt: skip
            self.differences.append(f"release {index}: {twin.mechanism} in D, {mechanism} in D'")
            return exact
        return twin.released.to(device=exact.device, dtype=exact.dtype).clone()

    def secret(self) -> int:
        self._secrets += 1
        if self._secrets > len(self.recorded.secrets):
            self.differences.append("a secret drawn in D' only")
            return 0
        return self.recorded.secrets[self._secrets - 1]


class ExactCount(RecordingNoise):
    """No noise at all: for tests of what a site derives from its released count."""

    def release(
        self, mechanism: str, exact: torch.Tensor, std: float, sensitivity: float
    ) -> torch.Tensor:
        return exact.clone()


def reply_content(reply: Message) -> tuple:
    """Everything of a reply that travels, as comparable values: its error, or its records
    (arrays by dtype, shape and bytes; metrics and configs by value)."""
    if reply.has_error():
        return ("error", reply.error.code, reply.error.reason)
    content = reply.content
    arrays = {
        key: {name: (a.dtype, tuple(a.shape), a.data) for name, a in record.items()}
        for key, record in content.array_records.items()
    }
    metrics = {key: dict(record) for key, record in content.metric_records.items()}
    configs = {key: dict(record) for key, record in content.config_records.items()}
    return ("content", arrays, metrics, configs)


def non_finite(reply: Message) -> list[str]:
    """Names of reply values that are not finite numbers."""
    if reply.has_error():
        return []
    found = []
    for record in reply.content.metric_records.values():
        found += [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    for record in reply.content.array_records.values():
        found += [
            k for k, a in record.items() if not torch.isfinite(torch.from_numpy(a.numpy())).all()
        ]
    return found


@dataclass(frozen=True)
class HostileMessage:
    """What a coordinator controls: the message's kind, round, weights and run config."""

    kind: str  # "train" | "evaluate"
    run_config: dict
    weights: dict[str, torch.Tensor] | None  # None: no arrays at all
    server_round: object = 1
    run_id: int = 1

    def build(self) -> Message:
        content = RecordDict({"config": ConfigRecord({"server-round": self.server_round})})
        if self.weights is not None:
            content["arrays"] = ArrayRecord({k: v.clone() for k, v in self.weights.items()})
        message = Message(content, dst_node_id=NODE, message_type=self.kind)
        message.metadata.__dict__["_run_id"] = self.run_id
        return message


@dataclass(frozen=True)
class Site:
    """One world's site: its records and its own state (ledger, split secret, policy), kept in
    `state` and moved to `active` while it answers, so both worlds' sites live at one path (a
    policy's path is in its refusals)."""

    data: Path
    state: Path
    active: Path
    policy: str = ""
    released_count: int | None = None  # a count an earlier run released: the ledger holds it

    def node_config(self) -> dict:
        ledger = self.active / "ledger.json"
        return {
            "data-path": str(self.data),
            "name": "site",
            "ledger-path": str(ledger),
            "policy-path": str(self.active / "policy.toml"),
        }

    def prepare(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        secret = self.state / "ledger.split-secret"
        if not secret.exists():
            secret.write_text(f"{SPLIT_SECRET}\n")  # the same split secret in both worlds
            (self.state / "policy.toml").write_text(self.policy)
            if self.released_count is not None:
                self._earlier_count(self.released_count)

    def _earlier_count(self, count: int) -> None:
        """The ledger of a site that answered an earlier federation: its count released."""
        policy = load_policy(self.state / "policy.toml")
        ledger = PrivacyLedger.open(self.state / "ledger.json", policy.data_set_name("site"))
        budget = SitePrivacy(policy, ledger, "", 1.0).budget(count)
        entry = LedgerEntry("earlier", 0, policy.count_noise, 1.0, 1, purpose="count")
        ledger.charge(budget, entry, "an earlier federation", released_count=count)


def answer(
    message: HostileMessage, site: Site, noise: NoiseSource, monkeypatch: pytest.MonkeyPatch
) -> Message:
    """The real ClientApp's reply, its gate drawing from `noise`."""
    site.prepare()
    context = Context(
        run_id=message.run_id, node_id=NODE, node_config=site.node_config(),
        state=RecordDict(), run_config=message.run_config,
    )  # fmt: skip
    site.state.rename(site.active)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(gate, "default_noise", lambda: noise)
            return client_app_module.app(message.build(), context)
    finally:
        site.active.rename(site.state)


def compare_worlds(
    message: HostileMessage, world: Site, neighbour: Site, replaced: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:  # fmt: skip
    """Every way the two replies differ beyond what the noise covers; [] when none."""
    recorded = RecordingNoise()
    reply = answer(message, world, recorded, monkeypatch)
    coupled = CoupledNoise(recorded)
    twin = answer(message, neighbour, coupled, monkeypatch)
    differences = list(coupled.differences)
    if len(coupled.exact) != len(recorded.releases):
        differences.append(f"{len(recorded.releases)} releases in D, {len(coupled.exact)} in D'")
    factor = 2.0 if replaced else 1.0
    for index, (mine, theirs) in enumerate(zip(recorded.releases, coupled.exact, strict=False)):
        gap = float(torch.linalg.vector_norm((mine.exact - theirs).double()))
        if not gap <= factor * mine.sensitivity * (1 + 1e-4) + 1e-5:
            differences.append(
                f"release {index} ({mine.mechanism}): exact values differ by {gap:.4g}, "
                f"sensitivity {mine.sensitivity:g}"
            )
    if reply_content(reply) != reply_content(twin):
        differences.append(f"replies differ: {_summary(reply)} | {_summary(twin)}")
    for name, sent in (("D", reply), ("D'", twin)):
        if bad := non_finite(sent):
            differences.append(f"{name}'s reply holds non-finite {bad}")
    return differences


def _summary(reply: Message) -> str:
    kind, *rest = reply_content(reply)
    if kind == "error":
        return f"error {rest[1]!r}"
    arrays, metrics, _ = rest
    return f"metrics {metrics}, arrays {sum(len(a) for a in arrays.values())}"


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def neighbour_files(
    directory: Path, header: list[str], rows: list[list[str]], kind: str, record: list[str]
) -> tuple[Path, Path]:
    """D and D': `record` appended to D' (add), appended to D (remove), or written over D's
    last record (replace)."""
    if kind == "add":
        worlds = rows, [*rows, record]
    elif kind == "remove":
        worlds = [*rows, record], rows
    else:
        worlds = rows, [*rows[:-1], record]
    names = (f"{next(_counter)}-d.csv", f"{next(_counter)}-d-prime.csv")
    return tuple(write_rows(directory / n, header, w) for n, w in zip(names, worlds, strict=True))


_counter = itertools.count()
