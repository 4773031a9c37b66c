"""A hostile coordinator reads a site's records one exact bit per reply, through NaN.

    .venv/bin/python -m bench.nan_predicate [--max-messages 1000] [--records 16] [--out FILE]

The auditor's report (measured on 8619928): received weights are never checked for finite values
(client/app.py), a NaN loss passes the per-record clamp (common/evaluation.py) and the Gaussian
mechanism (client/private_release.py), and one NaN per-sample gradient makes DP-SGD's clipped,
noised sum NaN (client/dp_optimizer.py), with nothing checking the outgoing model. Noise added to
NaN is NaN, so a reply that is NaN if and only if a record satisfies a predicate tells the
coordinator that bit exactly, whatever epsilon the site's ledger charges for it.

The real ClientApp (client.app:app) answers in process (tests/local_grid.py) on Switzerland's
heart records written as a joined site's file, with DP on, the strict default site policy and a
fresh ledger per attack. The coordinator knows what a federation member knows: the schema, the
model, the public split algorithm (common/partition.py) and how many records the site holds. Its
crafted weights are all finite (the largest is 1e20): the overflow happens inside the forward
pass, so a site that only refuses non-finite weights still answers. A search that ends on one of
its sentinels (below or above every plausible value) had no signal, so replies that are refused,
or carry only noise, recover nothing and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app
from bench.harness import setup_line
from common.model_factory import build_model
from common.partition import ClientSplit, holdout_split
from common.privacy_ledger import summarize
from common.run_config import PROJECT_ROOT, RunConfig
from common.schema import Schema
from common.site_data import load_site_data
from common.site_policy import SitePolicy
from common.tasks import task_schema
from tests.deployment_fixtures import write_site
from tests.local_grid import LocalGrid

SITE = "switzerland"
NODE = 7
ISOLATING_FRACTION = 0.001  # the smallest test split there is: one record
SEED_SEARCH = 100_000  # seeds tried for each record to isolate
WIDE_BATCH = 1_000_000  # a batch-size above any site's record count

# The coordinator's prior: each numeric feature's plausible raw values, at the resolution clinics
# record them (lowest, highest, step). A value off its grid cannot be recovered exactly.
NUMERIC_GRIDS = {
    "age": (18.0, 100.0, 1.0),
    "trestbps": (60.0, 240.0, 1.0),
    "chol": (0.0, 600.0, 1.0),
    "thalach": (50.0, 220.0, 1.0),
    "oldpeak": (-3.0, 6.5, 0.1),
}

# The crafted token is TOKEN_SCALE * (x - t): large enough that LayerNorm maps it to its sign for
# the smallest gap between a value and a threshold (0.005, half of chol's step once scaled).
TOKEN_SCALE = 1e4
# Query and key entries: their product (1e40) overflows float32 to +-inf.
LOGIT_SCALE = 1e20


@dataclass(frozen=True)
class Feature:
    """One column as the model sees it, with the values the coordinator searches over."""

    name: str
    numeric: bool
    column: int  # in the model's numeric or categorical input
    values: np.ndarray  # float64, ascending, encoded as the site encodes; sentinels first and last
    labels: tuple[str, ...]  # each value as the site's file spells it
    offset: int = 0  # a categorical feature's slot 0 in the model's one embedding table


def features(schema: Schema) -> list[Feature]:
    """Numeric features on NUMERIC_GRIDS, encoded (x - center) / scale in float32 as
    common/site_data.py does; categorical ones by slot (0: a value the schema does not list)."""
    found = []
    for column, numeric in enumerate(schema.numeric):
        low, high, step = NUMERIC_GRIDS[numeric.name]
        count = round((high - low) / step) + 1
        raw = [round(low + k * step, 6) for k in range(-1, count + 1)]  # a sentinel each side
        encoded = [float(np.float32((x - numeric.center) / numeric.scale)) for x in raw]
        labels = tuple(f"{x:g}" for x in raw)
        found.append(Feature(numeric.name, True, column, np.array(encoded), labels))
    offset = 0
    for column, (categorical, size) in enumerate(
        zip(schema.categorical, schema.category_sizes(), strict=True)
    ):
        slots = np.arange(-1, size + 1, dtype=np.float64)  # a sentinel each side
        labels = ("below", "unknown", *categorical.categories, "above")
        found.append(Feature(categorical.name, False, column, slots, labels, offset))
        offset += size
    return found


def crafted_state(
    template: dict[str, torch.Tensor],
    feature: Feature | None = None,
    threshold: float = 0.0,
    sign: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Weights whose logits are NaN if and only if sign * (value - threshold) > 0 for the record's
    `feature` (None: never), for common/models.py's TabularTransformer.

    Every tensor is zero but these. [CLS] is c = (1, 1, -1, -1, ...). The feature's token is
    sign * TOKEN_SCALE * (x - t) * e, e = (1, -1, 1, -1, ...) (a categorical feature: TOKEN_SCALE
    * e for the slots above t); every other token is 0. Block 0's first LayerNorm lets tokens
    through, normalised: the feature's becomes +-e, [CLS] stays c (e and c are orthogonal, zero
    mean, unit variance). Its query reads c and its key e, both scaled by LOGIT_SCALE, so [CLS]'s
    attention logit for the feature's token is +-inf and 0 for the others. A -inf logit gets
    weight 0; a +inf one makes softmax compute inf - inf = NaN, which each later layer keeps
    (NaN x 0 = NaN) up to the logits; for DP-SGD the per-sample gradient is NaN as well."""
    state = {name: torch.zeros_like(tensor) for name, tensor in template.items()}
    width = state["cls.weight"].shape[1]
    e = torch.tensor([(-1.0) ** k for k in range(width)])
    c = torch.tensor([1.0 if k % 4 < 2 else -1.0 for k in range(width)])
    ones = torch.ones(width)
    state["cls.weight"][0] = c
    state["blocks.0.ln1.weight"].fill_(1.0)
    state["blocks.0.attn.query.weight"] = LOGIT_SCALE / width * torch.outer(ones, c)
    state["blocks.0.attn.key.weight"] = LOGIT_SCALE / width * torch.outer(ones, e)
    state["ln_f.weight"].fill_(1.0)
    if feature is not None and feature.numeric:
        state["numeric_weight.weight"][feature.column] = sign * TOKEN_SCALE * e
        state["numeric_bias.weight"][feature.column] = -sign * TOKEN_SCALE * threshold * e
    elif feature is not None:
        for slot in range(len(feature.values) - 2):
            if sign * (slot - threshold) > 0:
                state["categorical.weight"][feature.offset + slot] = TOKEN_SCALE * e
    return state


def check_construction(
    template: dict[str, torch.Tensor], schema: Schema, config: RunConfig
) -> None:
    """Before any message: on records made up from each feature's own values (none of the
    site's), the crafted logits are NaN exactly where the predicate holds and finite elsewhere."""
    model = build_model(schema, config).eval()
    for feature in features(schema):
        values = feature.values[1:-1]  # the sentinels are no one's value
        numeric = torch.zeros(len(values), len(schema.numeric))
        categorical = torch.zeros(len(values), len(schema.categorical), dtype=torch.long)
        if feature.numeric:
            numeric[:, feature.column] = torch.tensor(values, dtype=torch.float32)
        else:
            categorical[:, feature.column] = torch.tensor(values).long()
        signs = (1.0, -1.0) if feature.numeric else (1.0,)  # categories are searched upwards
        for index, sign in itertools.product((0, len(values) // 2, len(values) - 2), signs):
            threshold = (values[index] + values[index + 1]) / 2
            model.load_state_dict(crafted_state(template, feature, threshold, sign))
            with torch.no_grad():
                nan = torch.isnan(model(numeric, categorical)).any(dim=1).numpy()
            if not np.array_equal(nan, sign * (values - threshold) > 0):
                raise RuntimeError(f"the crafted weights miss the predicate on {feature.name}")


def non_finite(reply: Message) -> bool:
    """A NaN or infinity anywhere in the reply: its metrics or its returned model."""
    metrics = reply.content.metric_records.get("metrics", {})
    if any(isinstance(value, float) and not math.isfinite(value) for value in metrics.values()):
        return True
    return any(
        not np.isfinite(array.numpy()).all()
        for record in reply.content.array_records.values()
        for array in record.values()
    )


class Coordinator:
    """Sends the site one crafted model per message and reads one bit from each reply. Each
    message's run id is the coordinator's to choose: a run whose planned evaluation replies are
    spent is simply followed by a new one (the site's `plan_run` counts them per run id)."""

    def __init__(self, node: dict[str, str], max_messages: int) -> None:
        self.node = node
        self.max_messages = max_messages
        self.sent = 0
        self.refusals: dict[str, int] = {}  # each reason the site gave, and how often
        self.stopped = False  # the cap is reached, or the site refuses even a fresh run
        self.run_id = 0
        self.server_round = 0
        self._grids: dict[RunConfig, LocalGrid] = {}

    def new_run(self) -> None:
        self.run_id += 1
        self.server_round = 0

    def send(self, kind: str, config: RunConfig, state: dict[str, torch.Tensor]) -> Message:
        if config not in self._grids:
            self._grids[config] = LocalGrid(client.app.app, config.to_mapping(), {NODE: self.node})
        TaskIdentity.run_id = self.run_id  # the message's metadata.run_id
        self.server_round += 1
        content = RecordDict(
            {
                "arrays": ArrayRecord(state),
                "config": ConfigRecord({"server-round": self.server_round}),
            }
        )
        self.sent += 1
        (reply,) = self._grids[config].send_and_receive(
            [Message(content, dst_node_id=NODE, message_type=kind)]
        )
        if reply.has_error():
            self.refusals[reply.error.reason] = self.refusals.get(reply.error.reason, 0) + 1
        return reply

    def ask(self, kind: str, config: RunConfig, state: dict[str, torch.Tensor]) -> bool | None:
        """True: the reply is non-finite (the predicate holds); False: it is finite; None: no
        answer (the message cap, or a refusal that a fresh run id does not lift)."""
        for attempt in range(2):
            if self.stopped or self.sent >= self.max_messages:
                self.stopped = True
                return None
            reply = self.send(kind, config, state)
            if not reply.has_error():
                return non_finite(reply)
            if attempt == 0:
                self.new_run()
        self.stopped = True
        return None


Predicate = Callable[[Feature, float, float], bool | None]


def extreme(feature: Feature, holds: Predicate, sign: float) -> float | None:
    """The largest (sign 1) or smallest (sign -1) of `feature`'s values among the records the
    predicate ranges over, by binary search on `holds(feature, t, sign)`: "some record has
    sign * (value - t) > 0". None when a reply is missing or the search ends on a sentinel."""
    ordered = sign * feature.values[:: int(sign)]  # ascending in sign * value
    low, high = 0, len(ordered) - 1
    while low < high:
        middle = (low + high) // 2
        answer = holds(feature, sign * (ordered[middle] + ordered[middle + 1]) / 2, sign)
        if answer is None:
            return None
        low, high = (middle + 1, high) if answer else (low, middle)
    if low in (0, len(ordered) - 1):
        return None  # every answer the same: no signal
    return float(sign * ordered[low])


@dataclass
class Row:
    attack: str
    messages: int
    refused: int
    recovered: str
    epsilon: float
    seconds: float
    details: list[str]


class Site:
    """Switzerland's records as a joined site holds them: its file, and a fresh ledger for each
    attack so that each epsilon is that attack's alone."""

    def __init__(self, root: Path, declared_rounds: int) -> None:
        self.root = root
        self.data = write_site(root / f"{SITE}.csv", SITE)
        self.config = RunConfig.from_mapping(
            {"dp": True, "local-epochs": 1, "num-server-rounds": declared_rounds,
             "run-dir": str(root)}
        )  # fmt: skip
        self.schema = task_schema(self.config)
        self.dataset = load_site_data(self.data, self.schema)  # the truth, encoded by the site
        self.template = build_model(self.schema, self.config).state_dict()
        self.held: ClientSplit | None = None

    @property
    def records(self) -> int:
        """What the coordinator is taken to know, the auditor's premise (at 8619928 a request
        for a larger batch-size is refused, uncharged, with the training-record count named)."""
        return len(self.dataset)

    def node(self, attack: str) -> dict[str, str]:
        return {
            "data-path": str(self.data),
            "name": SITE,
            "ledger-path": str(self.root / f"ledger-{attack}.json"),
        }

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Keeps the split the ClientApp loads for each message (client.app's own
        `load_local_split`, whatever its arguments), so that an attack on a split is scored
        against the records the site held, not the ones the coordinator asked for."""
        load = client.app.load_local_split

        def recorded(*args: object, **kwargs: object) -> ClientSplit:
            self.held = load(*args, **kwargs)
            return self.held

        with mock.patch.object(client.app, "load_local_split", recorded):
            yield

    def whole_batch(self, coordinator: Coordinator, config: RunConfig) -> RunConfig:
        """The run config with a batch-size that makes every DP-SGD step hold every record
        (Poisson rate 1): the one record that answers is never left out, and the site accounts
        one Gaussian release per round, fast to calibrate. A site that plans rate 1 for any batch
        at or above its count accepts one far above it (one evaluation of the freshly built
        model, to find out); one that refuses a batch above its training records (8619928) gets
        exactly as many as the requested split leaves."""
        wide = replace(config, batch_size=WIDE_BATCH)
        probe = coordinator.send(MessageType.EVALUATE, wide, self.template)
        if not probe.has_error():
            return wide
        train, _ = holdout_split(np.arange(self.records), config)
        return replace(config, batch_size=len(train))

    def spent(self, node: dict[str, str]) -> float:
        path = Path(node["ledger-path"])
        return max((run.epsilon for run in summarize(path)), default=0.0) if path.exists() else 0.0

    def holds(self, coordinator: Coordinator, kind: str, config: RunConfig) -> Predicate:
        """The predicate "some record has sign * (feature - t) > 0", asked of the site."""

        def ask(feature: Feature, threshold: float, sign: float) -> bool | None:
            state = crafted_state(self.template, feature, threshold, sign)
            return coordinator.ask(kind, config, state)

        return ask


def label(feature: Feature, value: float | None) -> str:
    """A value as the site's file spells it."""
    if value is None:
        return "nothing"
    matches = np.flatnonzero(feature.values == value)
    return feature.labels[int(matches[0])] if len(matches) else f"{value:.4g} (encoded, off grid)"


def isolating_seeds(site: Site, config: RunConfig, targets: np.ndarray) -> dict[int, int]:
    """For each target record, a seed whose one-record test split is that record (the public
    split algorithm, on the site's record count)."""
    wanted = set(int(t) for t in targets)
    seeds: dict[int, int] = {}
    indices = np.arange(site.records)
    for seed in range(SEED_SEARCH):
        (record,) = holdout_split(indices, replace(config, seed=seed))[1]
        if int(record) in wanted and int(record) not in seeds:
            seeds[int(record)] = seed
            if len(seeds) == len(wanted):
                break
    return seeds


def isolated_records(site: Site, max_messages: int, count: int) -> Row:
    """Evaluation replies, one record per run: every feature of each of the federation's default
    test records, binary-searched."""
    started = time.perf_counter()
    node = site.node("isolated")
    coordinator = Coordinator(node, max_messages)
    targets = holdout_split(np.arange(site.records), site.config)[1][:count]
    isolating = site.whole_batch(
        coordinator, replace(site.config, test_fraction=ISOLATING_FRACTION)
    )
    seeds = isolating_seeds(site, isolating, targets)
    numeric, categorical = site.dataset.inputs
    table = features(site.schema)
    exact = {feature.name: 0 for feature in table}
    whole = 0
    for target in targets:
        if coordinator.stopped:
            break
        if int(target) not in seeds:
            continue
        config = replace(isolating, seed=seeds[int(target)])
        coordinator.new_run()
        holds = site.holds(coordinator, MessageType.EVALUATE, config)
        hits = 0
        for feature in table:
            truth = (numeric if feature.numeric else categorical)[target, feature.column]
            value = extreme(feature, holds, 1.0)
            hit = value is not None and value == float(truth)
            exact[feature.name] += hit
            hits += hit
        whole += hits == len(table)
    values = sum(exact.values())
    return row(
        f"evaluation, one record per run (test-fraction {ISOLATING_FRACTION:g}, chosen seeds)",
        coordinator,
        f"{values} / {len(targets) * len(table)} values ({whole} / {len(targets)} records whole)",
        node,
        site,
        started,
        "exact per feature: "
        + ", ".join(f"{name} {hits}/{len(targets)}" for name, hits in exact.items()),
    )


def extremes(site: Site, attack: str, kind: str, title: str, max_messages: int) -> Row:
    """Each numeric feature's maximum and minimum over the records one message ranges over: the
    test split (evaluation) or the training records (DP-SGD) the site holds for a run with the
    federation's default settings."""
    started = time.perf_counter()
    node = site.node(attack)
    coordinator = Coordinator(node, max_messages)
    coordinator.new_run()
    site.held = None
    config = site.whole_batch(coordinator, site.config)
    holds = site.holds(coordinator, kind, config)
    numeric_features = [feature for feature in features(site.schema) if feature.numeric]
    found = {
        (feature.name, sign): extreme(feature, holds, sign)
        for feature in numeric_features
        for sign in (1.0, -1.0)
    }
    if site.held is None:  # no message reached the records: nothing to score against
        return row(title, coordinator, "nothing (no reply)", node, site, started)
    records = site.held.train if kind == MessageType.TRAIN else site.held.test
    exact, details = 0, []
    for feature in numeric_features:
        column = records.inputs[0][:, feature.column]
        texts = []
        for sign, truth in ((1.0, column.max()), (-1.0, column.min())):
            value = found[feature.name, sign]
            exact += value is not None and value == float(truth)
            texts.append(f"{label(feature, value)} (true {label(feature, float(truth))})")
        details.append(f"{feature.name}: max {texts[0]}, min {texts[1]}")
    recovered = (
        f"{exact} / {2 * len(numeric_features)} values (max and min of {len(records)} records)"
    )
    return row(title, coordinator, recovered, node, site, started, "; ".join(details))


def non_finite_weights(site: Site) -> Row:
    """One evaluation of the freshly built model with a NaN in the head's first bias: the plain
    form of the attack, which a site that screens received weights refuses before reading a
    record."""
    started = time.perf_counter()
    node = site.node("non-finite")
    coordinator = Coordinator(node, max_messages=2)
    coordinator.new_run()
    state = {name: tensor.clone() for name, tensor in site.template.items()}
    state["head.bias"][0] = math.nan
    config = site.whole_batch(coordinator, site.config)
    reply = coordinator.send(MessageType.EVALUATE, config, state)
    answer = "refused" if reply.has_error() else f"answered, NaN: {non_finite(reply)}"
    title = "evaluation of non-finite weights (NaN in head.bias)"
    return row(title, coordinator, answer, node, site, started)


def row(
    attack: str,
    coordinator: Coordinator,
    recovered: str,
    node: dict[str, str],
    site: Site,
    started: float,
    *details: str,
) -> Row:
    """An attack's line of the table, its ledger read at the end, each refusal reason noted."""
    refusals = [f"refused {count}x: {reason}" for reason, count in coordinator.refusals.items()]
    return Row(
        attack,
        coordinator.sent,
        sum(coordinator.refusals.values()),
        recovered,
        site.spent(node),
        time.perf_counter() - started,
        [*details, *refusals],
    )


def code_version() -> str:
    """The commit the imported code is from, so a table says which tree it measured."""
    git = ["git", "-C", str(PROJECT_ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    changes = " with uncommitted changes" if dirty.stdout.strip() else ""
    return f"{PROJECT_ROOT} at {head.stdout.strip() or 'unknown'}{changes}"


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    budget = SitePolicy().max_epsilon
    lines = [
        "## NaN predicate: a hostile coordinator against the real ClientApp",
        "",
        f"Command: `python -m bench.nan_predicate {' '.join(sys.argv[1:])}`".rstrip(),
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Code: {code_version()}.",
        f"Setup: {setup_line()}.",
        f"Site: {SITE} (heart), DP on, the default site policy, a fresh ledger per attack; "
        f"the coordinator declares {args.declared_rounds} rounds per run.",
        "",
        f"| attack | messages | refused | recovered exactly | site's epsilon (of {budget:g}) "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in rows:
        lines.append(
            f"| {entry.attack} | {entry.messages} | {entry.refused} | {entry.recovered} | "
            f"{entry.epsilon:.3f} | {entry.seconds:.0f} |"
        )
    lines.append("")
    lines += [f"- {entry.attack}: {detail}" for entry in rows for detail in entry.details]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-messages", type=int, default=1000, help="messages per attack, at most"
    )
    parser.add_argument(
        "--records", type=int, default=16, help="default test records to isolate, at most"
    )
    parser.add_argument(
        "--declared-rounds",
        type=int,
        default=1000,
        help="num-server-rounds the coordinator declares: more make each reply cheaper",
    )
    parser.add_argument(
        "--without-weight-bound",
        action="store_true",
        help="lift the site's bound on received weights (client/site_inputs.py), so the crafted "
        "model gets in and only the release gate stands between it and the records",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    if args.without_weight_bound:
        mock.patch("client.site_inputs.MAX_RECEIVED_WEIGHT", math.inf).start()
    warnings.filterwarnings("ignore", module="opacus")  # the accountants' numerical notes
    with tempfile.TemporaryDirectory() as scratch:
        site = Site(Path(scratch), args.declared_rounds)
        check_construction(site.template, site.schema, site.config)
        with site.watched():
            rows = [
                non_finite_weights(site),
                isolated_records(site, args.max_messages, args.records),
                extremes(site, "test", MessageType.EVALUATE, "evaluation, whole test split",
                         args.max_messages),
                extremes(site, "train", MessageType.TRAIN, "DP-SGD update, training records "
                         "(batch = all of them)", args.max_messages),
            ]  # fmt: skip
    body = markdown(rows, args)
    print(body)
    if args.out:
        args.out.write_text(body)


if __name__ == "__main__":
    main()
