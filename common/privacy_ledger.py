"""The client's on-disk privacy ledger: every DP-SGD round ever run on a data set.

Epsilon composes over the whole life of a data set, across rounds, process restarts and
separate federations. Opacus' accountant lives in memory and dies with the engine, so each round
is appended here and epsilon is always recomputed from the complete history.

File layout (JSON, one file may hold several data sets, keyed by the name the site gives its
records: the site's name unless its policy declares another data set)::

    {"format": "confide-privacy-ledger", "version": 2,
     "datasets": {"<name>": {"budget": {"target_epsilon": 3.0, "target_delta": 1e-05,
                                         "accountant": "prv", "neighbours": "add-remove"} | null,
                              "source": "/data/cleveland.csv (sha256 1f3a...)",
                              "released_count": 187 | null,
                              "entries": [{"run_id": ..., "server_round": ...,
                                           "noise_multiplier": ..., "sample_rate": ...,
                                           "steps": ..., "recorded_at": ...,
                                           "purpose": "train" | "evaluate" | "count"}, ...]}},
     "sha256": "<sha256 of the canonical JSON of everything above>"}

Every release computed from the records is an entry: DP-SGD rounds (``train``), noisy evaluation
replies and the noisy record count (Gaussian mechanisms: sample rate 1, one step). The budget
follows the name, not the file's bytes: appending or editing records keeps what was spent.
Version 1 ledgers (training entries only, keyed by a fingerprint of the file) are read as they
are and written back as version 2.

Safety rules:

* A ledger that cannot be read, or whose integrity hash does not match, raises ``LedgerError``:
  training is refused and the ledger is never reset to zero, because "no history" would mean
  "nothing spent" and silently break the promise.
* Writes are atomic (temp file in the same directory, fsync, ``os.replace``) and mode 0600, and
  read-modify-write runs under an exclusive lock, so concurrent federations on the same data set
  do not lose each other's rounds.
* A round is recorded even if it overshoots the budget: privacy already spent must be counted.
  Callers should record (or ``charge``) a round before its update leaves the client; a round
  recorded but never sent only over-counts, the reverse under-counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic_file import write_atomically
from common.privacy import HistoryEntry, PrivacyBudget, PrivacyConfigError, epsilon_of

logger = logging.getLogger(__name__)

FORMAT = "confide-privacy-ledger"
VERSION = 2
READABLE_VERSIONS = (1, 2)
PURPOSES = ("train", "evaluate", "count")
FILE_MODE = 0o600


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (unreadable, malformed, edited); training must stop."""


class BudgetExhausted(RuntimeError):
    """The next round would take the data set past its promised epsilon."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def dataset_fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """A sha256 that identifies a data set by content, so the budget follows the data.

    Covers each array's dtype, shape and bytes (length-prefixed so different splits of the
    same bytes differ). Object arrays are refused: their bytes are pointers, not data.
    """
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}/dataset/{len(arrays)}".encode())
    for array in arrays:
        arr = np.ascontiguousarray(array)
        if arr.dtype.hasobject:
            raise ValueError(
                "dataset_fingerprint cannot hash object arrays; encode the data to numeric or "
                "fixed-width string arrays first"
            )
        header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape)}, sort_keys=True)
        data = arr.tobytes()
        digest.update(len(header).to_bytes(8, "big") + header.encode())
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD round on this data set: what the accountant needs, plus where it came from."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str = field(default_factory=_utc_now)
    purpose: str = "train"

    def __post_init__(self) -> None:
        problem = _entry_problem(asdict(self))
        if problem:
            raise ValueError(f"invalid ledger entry: {problem}")

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _entry_problem(raw: Any) -> str | None:
    """What is wrong with a raw entry dict, or None; shared by construction and loading."""
    if not isinstance(raw, dict):
        return "entry is not an object"
    expected = {
        "run_id", "server_round", "noise_multiplier", "sample_rate", "steps", "recorded_at",
        "purpose",
    }  # fmt: skip
    if set(raw) != expected:
        return f"entry fields {sorted(raw)} != {sorted(expected)}"
    if not isinstance(raw["run_id"], str) or not isinstance(raw["recorded_at"], str):
        return "run_id and recorded_at must be strings"
    if not _is_int(raw["server_round"]) or raw["server_round"] < 0:
        return f"server_round must be an integer >= 0, got {raw['server_round']!r}"
    if not _is_float(raw["noise_multiplier"]) or raw["noise_multiplier"] <= 0:
        return f"noise_multiplier must be a finite number > 0, got {raw['noise_multiplier']!r}"
    if not _is_float(raw["sample_rate"]) or not 0 < raw["sample_rate"] <= 1:
        return f"sample_rate must be in (0, 1], got {raw['sample_rate']!r}"
    if not _is_int(raw["steps"]) or raw["steps"] < 1:
        return f"steps must be an integer >= 1, got {raw['steps']!r}"
    if raw["purpose"] not in PURPOSES:
        return f"purpose must be one of {PURPOSES}, got {raw['purpose']!r}"
    return None


def _budget_record(budget: PrivacyBudget) -> dict[str, Any]:
    return {
        "target_epsilon": float(budget.target_epsilon),
        "target_delta": float(budget.target_delta),
        "accountant": budget.accountant,
        "neighbours": budget.neighbours,
    }


def _canonical(content: dict[str, Any]) -> bytes:
    return json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _content_hash(content: dict[str, Any]) -> str:
    """Integrity hash over the canonical JSON of the content.

    It catches truncation, disk corruption and accidental hand edits. It does NOT stop a
    deliberate forger: there is no secret key, so anyone who edits the file can recompute it.
    Protect the file with permissions and backups; this is a tripwire, not a signature.
    """
    return hashlib.sha256(_canonical(content)).hexdigest()


def _empty_content() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "datasets": {}}


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    """Bytes -> validated content; any doubt is a LedgerError naming the file and the fix."""

    def fail(what: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {path} {what}: it was edited or corrupted; refusing to train; "
            "restore it from backup (never delete it: that would reset the spent budget to zero)"
        )

    def reject_constant(name: str) -> float:
        raise ValueError(f"non-finite number {name}")

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise fail("is not a Confide privacy ledger")
    if doc.get("version") not in READABLE_VERSIONS:
        raise fail(f"has unsupported version {doc.get('version')!r}")
    stored_hash = doc.pop("sha256", None)
    if not isinstance(stored_hash, str):
        raise fail("has no integrity hash")
    try:
        actual_hash = _content_hash(doc)
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. huge ints, deep nesting
        raise fail("cannot be hashed") from exc
    if actual_hash != stored_hash:
        raise fail("fails its integrity check")
    if set(doc) != {"format", "version", "datasets"} or not isinstance(doc["datasets"], dict):
        raise fail("has an unexpected layout")
    if doc["version"] == 1:
        _upgrade_from_version_1(doc)
    for fingerprint, dataset in doc["datasets"].items():
        if not isinstance(dataset, dict) or set(dataset) != DATASET_FIELDS:
            raise fail(f"has a malformed record for data set {fingerprint[:12]}")
        count = dataset["released_count"]
        if count is not None and (not _is_int(count) or count < 1):
            raise fail(f"has an invalid released count for data set {fingerprint[:12]}")
        if not isinstance(dataset["source"], str):
            raise fail(f"has an invalid source for data set {fingerprint[:12]}")
        budget = dataset["budget"]
        if budget is not None:
            try:
                PrivacyBudget(max_grad_norm=1.0, **budget)
            except (TypeError, PrivacyConfigError) as exc:
                raise fail(f"has an invalid budget for data set {fingerprint[:12]}") from exc
        if not isinstance(dataset["entries"], list):
            raise fail(f"has malformed entries for data set {fingerprint[:12]}")
        for entry in dataset["entries"]:
            problem = _entry_problem(entry)
            if problem:
                raise fail(f"has an invalid entry for data set {fingerprint[:12]} ({problem})")
    return doc


DATASET_FIELDS = {"budget", "entries", "released_count", "source"}


def _empty_dataset() -> dict[str, Any]:
    return {"budget": None, "entries": [], "released_count": None, "source": ""}


def _upgrade_from_version_1(doc: dict[str, Any]) -> None:
    """Version 1 held DP-SGD rounds only, keyed by a fingerprint of the file's bytes."""
    doc["version"] = VERSION
    for dataset in doc["datasets"].values():
        if not isinstance(dataset, dict):
            continue  # reported as malformed by the caller
        if isinstance(dataset.get("budget"), dict):
            dataset["budget"].setdefault("neighbours", "add-remove")
        for entry in dataset.get("entries", []) if isinstance(dataset.get("entries"), list) else []:
            if isinstance(entry, dict):
                entry.setdefault("purpose", "train")
        dataset.setdefault("released_count", None)
        dataset.setdefault("source", "")


def _read(path: Path) -> dict[str, Any]:
    """The ledger content; a missing file is an empty ledger, anything unreadable is an error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _empty_content()
    except OSError as exc:
        raise LedgerError(
            f"privacy ledger {path} cannot be read ({exc.strerror}); refusing to train; "
            "fix its permissions or restore it from backup"
        ) from exc
    return _parse(path, raw)


def _write_atomic(path: Path, content: dict[str, Any]) -> None:
    """Replace the file in one step so a crash leaves either the old or the new ledger."""
    doc = dict(content)
    doc["sha256"] = _content_hash(content)
    data = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode("ascii") + b"\n"
    write_atomically(path, data, FILE_MODE)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on a sibling lock file (the ledger's inode changes on each replace)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class PrivacyLedger:
    """The history of one data set inside a ledger file, and the budget check on top of it."""

    def __init__(self, path: Path, fingerprint: str, content: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._content = content
        self._checked_budget: PrivacyBudget | None = None

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> PrivacyLedger:
        """Load the ledger (missing file -> empty); LedgerError if it cannot be trusted."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string; use dataset_fingerprint()")
        path = Path(path)
        return cls(path, fingerprint, _read(path))

    def _dataset(self) -> dict[str, Any]:
        return self._content["datasets"].get(self.fingerprint, _empty_dataset())

    def entries(self) -> list[LedgerEntry]:
        """Every recorded round of every run on this data set, oldest first."""
        return [LedgerEntry(**raw) for raw in self._dataset()["entries"]]

    def history(self) -> list[HistoryEntry]:
        """The accountant history for this data set: ``(noise_multiplier, sample_rate, steps)``."""
        return [entry.history_entry for entry in self.entries()]

    def stored_budget(self) -> PrivacyBudget | None:
        """The budget this data set was first charged under (None before the first round)."""
        raw = self._dataset()["budget"]
        return None if raw is None else PrivacyBudget(max_grad_norm=1.0, **raw)

    def epsilon_spent(self, delta: float, accountant: str, neighbours: str = "add-remove") -> float:
        """Epsilon spent on this data set so far, at ``delta``, over every release of every run."""
        return epsilon_of(self.history(), delta, accountant, neighbours)

    def released_count(self) -> int | None:
        """The noisy record count released earlier (repeating it costs nothing), or None."""
        return self._dataset()["released_count"]

    def refresh(self) -> None:
        """Re-read the file: another process (another federation) may have recorded rounds.

        No lock needed: writers replace the file atomically, so a reader sees old or new.
        """
        self._content = _read(self.path)

    def _check_same_budget(self, budget: PrivacyBudget) -> None:
        """The promise is per data set: a later run may not quietly move the goalposts."""
        stored = self._dataset()["budget"]
        if stored is not None and stored != _budget_record(budget):
            raise PrivacyConfigError(
                f"privacy budget for data set {self.fingerprint!r} in {self.path} is "
                f"epsilon {stored['target_epsilon']:g} at delta {stored['target_delta']:g} "
                f"({stored['accountant']}, {stored['neighbours']}), but now it is "
                f"epsilon {budget.target_epsilon:g} at delta {budget.target_delta:g} "
                f"({budget.accountant}, {budget.neighbours}); a data set keeps the budget it was "
                "first charged under: restore the site policy's max-epsilon, delta, accountant "
                "and example-count, or declare a new data set (data-set in the policy)"
            )

    def _check(
        self, budget: PrivacyBudget, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        self._check_same_budget(budget)
        # Validates the planned round the same way a recorded one is validated.
        LedgerEntry("check", 0, noise_multiplier, sample_rate, steps, "")
        history = self.history()
        delta, mechanism, relation = budget.target_delta, budget.accountant, budget.neighbours
        after = epsilon_of(
            [*history, (noise_multiplier, sample_rate, steps)], delta, mechanism, relation
        )
        if after > budget.target_epsilon:
            spent = epsilon_of(history, delta, mechanism, relation)
            raise BudgetExhausted(
                f"privacy budget exhausted: epsilon {spent:.2f} of "
                f"{budget.target_epsilon:.2f} spent (delta {delta:g}); the next round would "
                f"reach {after:.2f}, so it is refused for data set {self.fingerprint!r}"
            )
        self._checked_budget = budget
        return after

    def check_round(
        self, budget: PrivacyBudget, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon after the proposed round if it fits the budget; else BudgetExhausted.

        Re-reads the file first so rounds recorded by other processes count. The budget passed
        here is remembered and stored with the next ``record``.
        """
        self.refresh()
        return self._check(budget, noise_multiplier, sample_rate, steps)

    def record(self, entry: LedgerEntry, budget: PrivacyBudget | None = None) -> None:
        """Append a round and write the file atomically (mode 0600), under the file lock.

        Always records, even past the budget: spent privacy must never go uncounted. The budget
        (given here, or the one last passed to ``check_round``) is stored the first time so
        ``summarize`` can report what is left; a different budget later is not stored.
        """
        if not isinstance(entry, LedgerEntry):
            raise TypeError(f"record() takes a LedgerEntry, got {type(entry).__name__}")
        if budget is None:
            budget = self._checked_budget
        with _locked(self.path):
            self._content = _read(self.path)
            self._append(entry, budget)

    def charge(
        self,
        budget: PrivacyBudget,
        entry: LedgerEntry,
        source: str = "",
        released_count: int | None = None,
    ) -> float:
        """Check and record one round in one locked step; returns epsilon after it.

        Use this before training (or at least before the update is sent) when several
        federations may use the same data set at once: two separate check-then-record calls
        could both pass and together overshoot the budget.
        """
        with _locked(self.path):
            self._content = _read(self.path)
            after = self._check(budget, entry.noise_multiplier, entry.sample_rate, entry.steps)
            self._append(entry, budget, source, released_count)
        return after

    def _append(
        self,
        entry: LedgerEntry,
        budget: PrivacyBudget | None,
        source: str = "",
        released_count: int | None = None,
    ) -> None:
        """Caller holds the lock and has just re-read the file. `source` says where the records
        are now (a person reading the ledger tells data sets apart by it); `released_count` is
        stored with the charge for the noisy count, so it is only ever released once."""
        datasets = self._content["datasets"]
        dataset = datasets.setdefault(self.fingerprint, _empty_dataset())
        if source:
            dataset["source"] = source
        if released_count is not None:
            dataset["released_count"] = int(released_count)
        if budget is not None:
            if dataset["budget"] is None:
                dataset["budget"] = _budget_record(budget)
            elif dataset["budget"] != _budget_record(budget):
                logger.warning(
                    "round recorded for data set %s under a budget that differs from the stored "
                    "one; the stored budget is kept",
                    self.fingerprint[:12],
                )
        dataset["entries"].append(asdict(entry))
        _write_atomic(self.path, self._content)
        logger.info(
            "privacy ledger %s: recorded %s of run %s round %d (sigma %.4g, q %.4g, %d steps)",
            self.path, entry.purpose, entry.run_id, entry.server_round, entry.noise_multiplier,
            entry.sample_rate, entry.steps,
        )  # fmt: skip


@dataclass(frozen=True)
class RunSummary:
    """One run on one data set, as ``confide privacy LEDGER`` shows it.

    ``epsilon`` is cumulative over the data set's whole history up to this run's last round, and
    always comes with the ``delta`` it holds at. ``budget_left`` is only given when the ledger
    stores a target at that same delta.
    """

    fingerprint: str  # the data set's name in the ledger
    run_id: str
    rounds: int  # DP-SGD rounds of this run
    first_recorded_at: str
    last_recorded_at: str
    epsilon: float
    delta: float
    accountant: str
    target_epsilon: float | None
    budget_left: float | None
    source: str = ""
    evaluations: int = 0  # noisy evaluation replies of this run
    split: dict[str, float] = field(default_factory=dict)
    """Cumulative epsilon of each purpose alone (train, evaluate, count) up to this run; they
    compose to ``epsilon``, which is less than their sum."""


def recorded_entries(path: Path) -> list[LedgerEntry]:
    """Every entry of every data set in the ledger at `path`, oldest first within each."""
    content = _read(Path(path))
    return [LedgerEntry(**raw) for data in content["datasets"].values() for raw in data["entries"]]


def dp_sgd_steps(entries: Iterable[LedgerEntry]) -> list[HistoryEntry]:
    """The accountant's history of the DP-SGD rounds alone: the plan an audit tests."""
    return [entry.history_entry for entry in entries if entry.purpose == "train"]


def summarize(path: Path, delta: float | None = None) -> list[RunSummary]:
    """Per data set and per run: rounds and cumulative epsilon (with its delta), budget left.

    ``delta`` defaults to the one stored with each data set's budget; a data set without a
    stored budget needs an explicit ``delta``.
    """
    path = Path(path)
    if delta is not None and not (_is_float(delta) and 0 < delta < 1):
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}; e.g. 1e-5")
    if not path.exists():
        raise LedgerError(f"no privacy ledger at {path}; check the path")
    content = _read(path)
    summaries: list[RunSummary] = []
    for fingerprint in sorted(content["datasets"]):
        ledger = PrivacyLedger(path, fingerprint, content)
        stored = ledger.stored_budget()
        if delta is None and stored is None:
            raise PrivacyConfigError(
                f"data set {fingerprint[:12]} in {path} has no stored budget, so no delta; "
                "pass delta (e.g. 1e-5) to report its epsilon"
            )
        if delta is not None:
            at_delta = delta
        else:
            assert stored is not None
            at_delta = stored.target_delta
        mechanism = stored.accountant if stored is not None else "prv"
        relation = stored.neighbours if stored is not None else "add-remove"
        target = stored.target_epsilon if stored is not None else None
        same_delta = stored is not None and stored.target_delta == at_delta
        entries = ledger.entries()
        last_index: dict[str, int] = {}
        for index, entry in enumerate(entries):
            last_index[entry.run_id] = index
        for run_id, end in last_index.items():
            run_entries = [e for e in entries[: end + 1] if e.run_id == run_id]
            history = [e.history_entry for e in entries[: end + 1]]
            epsilon = epsilon_of(history, at_delta, mechanism, relation)
            split = {
                purpose: epsilon_of(
                    [e.history_entry for e in entries[: end + 1] if e.purpose == purpose],
                    at_delta,
                    mechanism,
                    relation,
                )
                for purpose in PURPOSES
            }
            summaries.append(
                RunSummary(
                    fingerprint=fingerprint,
                    run_id=run_id,
                    rounds=sum(e.purpose == "train" for e in run_entries),
                    first_recorded_at=run_entries[0].recorded_at,
                    last_recorded_at=run_entries[-1].recorded_at,
                    epsilon=epsilon,
                    delta=at_delta,
                    accountant=mechanism,
                    target_epsilon=target,
                    budget_left=(
                        max(0.0, target - epsilon) if same_delta and target is not None else None
                    ),
                    source=content["datasets"][fingerprint]["source"],
                    evaluations=sum(e.purpose == "evaluate" for e in run_entries),
                    split=split,
                )
            )
    return summaries
