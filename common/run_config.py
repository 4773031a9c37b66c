"""One typed, validated view of a run's settings.

Flower hands both apps `context.run_config`, a flat dict of `kebab-case` keys whose defaults live in
`pyproject.toml` (`[tool.flwr.app.config]`). Reading it through `RunConfig.from_mapping` means a typo or
an impossible value fails at start, with the valid names listed, instead of mid-run on some client.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

from common.privacy import PrivacyBudget, PrivacyConfigError
from common.site_policy import EXAMPLE_COUNT_MODES, TRAINING_METRICS_MODES

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TASKS = ("heart", "bank", "banking77", "medical-text", "custom")
PARTITIONERS = ("natural", "iid", "dirichlet")
STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
NORM_ACTIONS = ("reject", "clip")
OPTIMIZERS = ("adam", "sgd")
HOLDOUTS = ("test", "validation")
DP_MODES = ("auto", "hooks", "ew", "functorch")
"""Opacus modes that form per-sample gradients, which the site's release gate sanitises one by
one (client/privacy/gate.py); ghost clipping never forms them, so a site cannot run it."""
TOKEN_EMBEDDINGS = ("frozen", "trained")
SECAGG_MODULUS = 2**32  # SecAgg+'s masking modulus (Flower's default, and its maximum)
CLIENT_DP_CLIPPING = ("server", "client", "adaptive")
AUDIT_KINDS = ("white-box-gradient", "black-box-input")  # client/canaries.py
# Upper bounds on what a run may make a site do: every site validates the coordinator's settings
# with this class, so a hostile value is refused before a record is read or memory is taken.
MAX_ROUNDS = 10_000
MAX_EPOCHS = 100
MAX_BATCH = 2**20  # above any plausible site's record count
MAX_WIDTH = 4096
MAX_DEPTH = 64
MAX_LENGTH = 8192
MAX_VOCAB = 2**20


class RunConfigError(ValueError):
    """A run setting that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    task: str
    data_file: str
    schema_file: str
    partitioner: str
    partition_column: str
    dirichlet_alpha: float
    num_clients: int
    test_fraction: float
    holdout: str
    seed: int
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    dropout_fraction: float
    straggler_fraction: float
    straggler_delay: float
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    num_malicious: int
    trim_beta: float
    max_update_norm: float
    norm_action: str
    max_num_examples: int
    round_timeout: float
    min_train_replies: int
    round_retries: int
    local_epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    dp: bool
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    noise_multiplier: float
    accountant: str
    dp_mode: str
    physical_batch_size: int
    dp_optimizer: str
    dp_learning_rate: float
    dp_token_embedding: str
    example_count: str
    training_metrics: str
    site_policy: str
    client_dp: bool
    client_dp_clipping: str
    client_dp_noise_multiplier: float
    client_dp_clipping_norm: float
    client_dp_max_epsilon: float
    secagg: bool
    secagg_num_shares: float
    secagg_reconstruction_threshold: float
    secagg_clipping_range: float
    secagg_quantization_range: int
    secagg_max_weight: int
    audit_canaries: int
    audit_kind: str
    model_width: int
    model_depth: int
    model_heads: int
    max_length: int
    vocab_size: int
    init_checkpoint: str
    model: str
    lora_rank: int
    lora_alpha: float
    lora_targets: str
    run_dir: str
    resume: bool

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Check names and types of every key; missing keys take the pyproject defaults. Every
        unknown or mistyped setting is reported at once; ranges are checked once types hold."""
        problems = []
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            problems.append(
                f"{source}: unknown setting {', '.join(repr(k) for k in unknown)}; "
                f"valid settings: {', '.join(cls.keys())}"
            )
        merged = {**default_run_config(), **values}
        hints = get_type_hints(cls)
        kwargs = {}
        for key in cls.keys():
            attr = key.replace("-", "_")
            if key not in merged:
                problems.append(f"{source}: setting '{key}' has no value and no default")
                continue
            try:
                kwargs[attr] = _coerce(merged[key], hints[attr], key, source)
            except RunConfigError as error:
                problems.append(str(error))
        _raise_if_any(problems)
        config = cls(**kwargs)
        config.validate(source)
        return config

    def to_mapping(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def validate(self, source: str = "run config") -> None:
        """Range checks, then how settings combine: one error lists every problem, each naming
        the setting and what would be accepted."""
        checks = [
            ("task", self.task in TASKS, f"one of {', '.join(TASKS)}"),
            ("partitioner", self.partitioner in PARTITIONERS, f"one of {', '.join(PARTITIONERS)}"),
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            ("seed", 0 <= self.seed < 2**63, "an integer from 0 to 2**63 - 1"),  # numpy, torch
            (
                "num-server-rounds",
                1 <= self.num_server_rounds <= MAX_ROUNDS,
                f"an integer from 1 to {MAX_ROUNDS}",
            ),
            ("num-clients", self.num_clients >= 1, "an integer >= 1"),
            ("fraction-train", 0 < self.fraction_train <= 1, "a number in (0, 1]"),
            ("fraction-evaluate", 0 < self.fraction_evaluate <= 1, "a number in (0, 1]"),
            ("dropout-fraction", 0 <= self.dropout_fraction <= 1, "a number in [0, 1]"),
            (
                "straggler-fraction",
                0 <= self.straggler_fraction <= 1 - self.dropout_fraction,
                f"a number in [0, 1 - dropout-fraction] = [0, {1 - self.dropout_fraction:g}]",
            ),
            ("straggler-delay", self.straggler_delay >= 0, "a number of seconds >= 0"),
            ("test-fraction", 0 < self.test_fraction < 1, "a number in (0, 1)"),
            ("holdout", self.holdout in HOLDOUTS, f"one of {', '.join(HOLDOUTS)}"),
            ("dirichlet-alpha", self.dirichlet_alpha > 0, "a number > 0"),
            (
                "local-epochs",
                1 <= self.local_epochs <= MAX_EPOCHS,
                f"an integer from 1 to {MAX_EPOCHS}",
            ),
            ("batch-size", 1 <= self.batch_size <= MAX_BATCH, f"an integer from 1 to {MAX_BATCH}"),
            ("learning-rate", self.learning_rate > 0, "a number > 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("dp-optimizer", self.dp_optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("dp-learning-rate", self.dp_learning_rate > 0, "a number > 0"),
            (
                "client-dp-clipping",
                self.client_dp_clipping in CLIENT_DP_CLIPPING,
                f"one of {', '.join(CLIENT_DP_CLIPPING)}",
            ),
            ("client-dp-noise-multiplier", self.client_dp_noise_multiplier > 0, "a number > 0"),
            ("client-dp-clipping-norm", self.client_dp_clipping_norm > 0, "a number > 0"),
            ("client-dp-max-epsilon", self.client_dp_max_epsilon > 0, "a number > 0"),
            ("secagg-num-shares", 0 < self.secagg_num_shares <= 1, "a fraction in (0, 1]"),
            (
                "secagg-reconstruction-threshold",
                0 < self.secagg_reconstruction_threshold <= 1,
                "a fraction in (0, 1]",
            ),
            ("secagg-clipping-range", self.secagg_clipping_range > 0, "a number > 0"),
            ("secagg-max-weight", self.secagg_max_weight >= 1, "an integer >= 1"),
            ("secagg-quantization-range", self.secagg_quantization_range >= 2, "an integer >= 2"),
            ("weight-decay", self.weight_decay >= 0, "a number >= 0"),
            ("proximal-mu", self.proximal_mu >= 0, "a number >= 0"),
            ("server-learning-rate", self.server_learning_rate > 0, "a number > 0"),
            ("round-timeout", self.round_timeout > 0, "a number of seconds > 0"),
            (
                "min-train-replies",
                1 <= self.min_train_replies <= self.num_clients,
                f"an integer from 1 to num-clients ({self.num_clients})",
            ),
            ("round-retries", self.round_retries >= 0, "an integer >= 0"),
            ("num-malicious", self.num_malicious >= 0, "an integer >= 0"),
            ("trim-beta", 0 <= self.trim_beta < 0.5, "a number in [0, 0.5)"),
            ("max-update-norm", self.max_update_norm >= 0, "0 (no bound) or a number > 0"),
            ("norm-action", self.norm_action in NORM_ACTIONS, f"one of {', '.join(NORM_ACTIONS)}"),
            ("max-num-examples", self.max_num_examples >= 1, "an integer >= 1"),
            (
                "model-width",
                1 <= self.model_width <= MAX_WIDTH,
                f"an integer from 1 to {MAX_WIDTH}",
            ),
            (
                "model-depth",
                1 <= self.model_depth <= MAX_DEPTH,
                f"an integer from 1 to {MAX_DEPTH}",
            ),
            (
                "model-heads",
                1 <= self.model_heads <= MAX_WIDTH,
                f"an integer from 1 to {MAX_WIDTH}",
            ),
            (
                "model-width",
                self.model_width % max(self.model_heads, 1) == 0,
                f"a multiple of model-heads ({self.model_heads})",
            ),
            (
                "max-length",
                1 <= self.max_length <= MAX_LENGTH,
                f"an integer from 1 to {MAX_LENGTH}",
            ),
            ("noise-multiplier", self.noise_multiplier >= 0, "0 (calibrate) or a sigma > 0"),
            ("dp-mode", self.dp_mode in DP_MODES, f"one of {', '.join(DP_MODES)}"),
            (
                "physical-batch-size",
                1 <= self.physical_batch_size <= MAX_BATCH,
                f"an integer from 1 to {MAX_BATCH}",
            ),
            (
                "dp-token-embedding",
                self.dp_token_embedding in TOKEN_EMBEDDINGS,
                f"one of {', '.join(TOKEN_EMBEDDINGS)}",
            ),
            ("vocab-size", 3 <= self.vocab_size <= MAX_VOCAB, f"an integer from 3 to {MAX_VOCAB}"),
            (
                "example-count",
                self.example_count in EXAMPLE_COUNT_MODES,
                f"one of {', '.join(EXAMPLE_COUNT_MODES)}",
            ),
            (
                "training-metrics",
                self.training_metrics in TRAINING_METRICS_MODES,
                f"one of {', '.join(TRAINING_METRICS_MODES)}",
            ),
            ("audit-canaries", self.audit_canaries >= 0, "0 (no audit) or canaries per site"),
            ("audit-kind", self.audit_kind in AUDIT_KINDS, f"one of {', '.join(AUDIT_KINDS)}"),
            (
                "lora-rank",
                0 <= self.lora_rank <= MAX_WIDTH,
                f"0 (LoRA off) or a rank from 1 to {MAX_WIDTH}",
            ),
            (
                "model",
                self.model == "builtin" or self.model.startswith("hf:"),
                "'builtin' or 'hf:NAME' (a Hugging Face checkpoint installed on every side)",
            ),
            ("lora-alpha", self.lora_alpha > 0, "a number > 0 (adapters are scaled by alpha/rank)"),
        ]
        problems = [
            f"{source}: '{key}' = {getattr(self, key.replace('-', '_'))!r} is invalid; use {expected}"
            for key, ok, expected in checks
            if not ok
        ]
        if self.dp and self.strategy == "fedprox":
            problems.append(
                f"{source}: strategy 'fedprox' with dp = true: Opacus clips per-sample gradients "
                "of the data loss only, so the proximal term would be silently dropped; use "
                "fedavg or fedadam with DP"
            )
        if self.secagg:
            problems += self._secure_aggregation_problems(source)
        if self.client_dp and self.strategy != "fedavg":
            problems.append(
                f"{source}: client-dp = true needs strategy 'fedavg' (Flower's accountant for "
                f"fixed clipping assumes a plain uniform average), not '{self.strategy}'"
            )
        if self.dp:
            try:
                self.privacy_budget()  # an impossible budget fails here, naming the setting
            except RunConfigError as error:
                problems.append(str(error))
        if self.audit_canaries and self.audit_kind == AUDIT_KINDS[0]:
            problems += self._gradient_canary_problems(source)
        if self.lora_rank and self.dp_token_embedding == "trained":
            problems.append(
                f"{source}: dp-token-embedding 'trained' with lora-rank = {self.lora_rank}: LoRA "
                "freezes every tensor but its adapters and the head; set dp-token-embedding = "
                "'frozen' or lora-rank = 0"
            )
        if self.model.startswith("hf:") and (not self.lora_rank or self.init_checkpoint):
            problems.append(
                f"{source}: model {self.model!r} trains LoRA adapters on its own frozen weights: "
                'set lora-rank >= 1 and init-checkpoint = ""'
            )
        if self.task == "custom" and not (self.data_file and self.schema_file):
            problems.append(
                f"{source}: task 'custom' needs 'data-file' and 'schema-file' "
                "(confide simulate --data FILE --schema SCHEMA.toml)"
            )
        _raise_if_any(problems)

    def _gradient_canary_problems(self, source: str) -> list[str]:
        """White-box canaries live in Confide's flat DP-SGD optimizer (client/privacy/optimizer.py)."""
        problems = []
        if not self.dp:
            problems.append(
                f"{source}: audit-canaries = {self.audit_canaries} of audit-kind "
                "'white-box-gradient' need dp = true (they enter DP-SGD's clipped sum); set "
                "dp = true or audit-kind = 'black-box-input'"
            )
        return problems

    def _secure_aggregation_problems(self, source: str) -> list[str]:
        """Under SecAgg+ the coordinator sees only the sum: whatever needs one update is refused."""
        blind = "the coordinator sees only the masked sum, never one client's update"
        problems = [
            (self.strategy != "fedavg", f"strategy '{self.strategy}': use fedavg ({blind})"),
            (self.max_update_norm > 0, f"max-update-norm > 0: set it to 0 ({blind})"),
            (self.client_dp, f"client-dp = true: clipping each update needs it in clear ({blind})"),
            (self.num_clients < 2, "num-clients < 2: masks cancel only among two or more clients"),
            (
                self.num_clients * self.secagg_quantization_range > SECAGG_MODULUS,
                f"secagg-quantization-range x num-clients above 2**32: the masked sum would "
                "overflow; lower secagg-quantization-range to "
                f"{SECAGG_MODULUS // max(self.num_clients, 1)}",
            ),
        ]
        found = [message for failed, message in problems if failed]
        return [f"{source}: secagg = true cannot run with " + "; ".join(found)] if found else []

    def lora_target_names(self) -> tuple[str, ...]:
        """`lora-targets` as module names within a block, e.g. ("attn.query", "mlp.fc")."""
        return tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())

    def privacy_budget(self) -> PrivacyBudget:
        """The budget the run asks for: each site plans its releases within it, and its own
        policy's max-epsilon caps it (client/privacy/training.py)."""
        try:
            return PrivacyBudget(
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                max_grad_norm=self.max_grad_norm,
                accountant=self.accountant,
            )
        except (PrivacyConfigError, TypeError, ValueError) as error:
            raise RunConfigError(str(error)) from None


def _raise_if_any(problems: list[str]) -> None:
    """One error for all problems, on one line as the command line prints it, joined as
    `common/site_policy.py` joins a policy's problems."""
    if problems:
        raise RunConfigError("; ".join(problems))


def _coerce(value: Any, expected: type, key: str, source: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise RunConfigError(
            f"{source}: '{key}' = {value!r} is a {type(value).__name__}; "
            f"expected {expected.__name__}"
        )
    if expected is float and not math.isfinite(value):
        raise RunConfigError(f"{source}: '{key}' = {value!r} must be a finite number")
    return value


def cached_run_config(values: Mapping[str, Any]) -> RunConfig:
    """`RunConfig.from_mapping` once per distinct run config and process: a simulation worker
    handles thousands of messages of one run, each carrying the same config."""
    return _cached_run_config(tuple(sorted(values.items())))


@lru_cache(maxsize=8)
def _cached_run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


@lru_cache(maxsize=1)
def _manifest_config() -> dict[str, Any]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as manifest:
        return dict(tomllib.load(manifest)["tool"]["flwr"]["app"]["config"])


def default_run_config() -> dict[str, Any]:
    """The defaults, read from the one place they live: the app manifest."""
    return dict(_manifest_config())


def parse_override(assignment: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line, VALUE typed as TOML would type it (3, 0.5, true, "x")."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RunConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set num-clients=10")
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value
