"""A text encoder pretrained on a public corpus (`confide pretrain`), and the global model's start
from it (`init-checkpoint`).

The file is safetensors (no pickle, so loading one runs no code) whose metadata names the
architecture settings it fits and the corpus it learned from. A run whose settings differ is
refused at start naming each setting, instead of failing on a tensor shape mid-round; the check
runs on the coordinator before any site trains or charges its ledger (with LoRA each site loads
the file too, to rebuild the frozen base: common/federated_model.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from common.checkpoint import save_weights
from common.model_factory import build_model
from common.run_config import RunConfig
from common.schema import Schema
from common.tasks import DATA_DIR

FORMAT = "confide-pretrained-text/1"
ARCHITECTURE = ("vocab-size", "max-length", "model-width", "model-depth", "model-heads")
HEAD = "head."  # sized by each task's classes: never taken from a checkpoint
CHECKPOINT_DIR = DATA_DIR / "checkpoints"  # the shipped ones
MAX_NAMED = 5  # tensors named in an error before the rest are counted


class InitCheckpointError(ValueError):
    """An init-checkpoint the run cannot start from; the message names the path and the fix."""


def architecture(config: RunConfig) -> dict[str, str]:
    settings = config.to_mapping()
    return {key: str(settings[key]) for key in ARCHITECTURE}


def save_pretrained(model: nn.Module, path: Path, config: RunConfig, facts: dict[str, str]) -> None:
    """Write the whole model (its corpus head too, for inspection) atomically; `facts` records
    the corpus, its sha256 and how it was trained."""
    save_weights(model.state_dict(), path, {"format": FORMAT, **architecture(config), **facts})


def resolve_checkpoint(value: str) -> Path:
    """A relative path names a shipped checkpoint when data/checkpoints/ has it, else a file
    relative to the working directory (the coordinator's, under `flwr run`: give it absolute)."""
    path = Path(value).expanduser()
    if path.is_absolute() or not (CHECKPOINT_DIR / path).is_file():
        return path.resolve()
    return CHECKPOINT_DIR / path


def require_shipped(config: RunConfig) -> None:
    """With LoRA each site rebuilds the frozen base from its own copy of the checkpoint, so the
    run may name only one shipped with Confide: a coordinator can neither point a site at another
    file on its disk nor learn from the site's error which files exist there."""
    name = config.init_checkpoint
    if Path(name).name != name or not (CHECKPOINT_DIR / name).is_file():
        shipped = ", ".join(sorted(path.name for path in CHECKPOINT_DIR.glob("*.safetensors")))
        raise InitCheckpointError(
            f"init-checkpoint {name!r}: with lora-rank > 0 it must name a checkpoint shipped in "
            f"{CHECKPOINT_DIR} (each site loads its own copy): {shipped}; to start from "
            "another, install it there on the coordinator and on every site"
        )


def init_checkpoint_as_sent(config: RunConfig) -> RunConfig:
    """`config` with its init-checkpoint made absolute, for a run submitted to a coordinator: its
    ServerApp starts in the coordinator's working directory, not the operator's. A shipped
    checkpoint keeps its name: every site has its own copy (LoRA rebuilds the frozen base there),
    wherever Confide is installed. The file itself is checked where the model is built."""
    if not config.init_checkpoint:
        return config
    path = resolve_checkpoint(config.init_checkpoint)
    sent = config.init_checkpoint if path.is_relative_to(CHECKPOINT_DIR) else str(path)
    return dataclasses.replace(config, init_checkpoint=sent)


def initial_state(schema: Schema, config: RunConfig) -> dict[str, Tensor]:
    """The global model's first weights: freshly initialised, or with every tensor but the head
    from `init-checkpoint` (the head keeps its fresh initialisation: its classes are the task's)."""
    state = build_model(schema, config).state_dict()
    if not config.init_checkpoint:
        return state
    encoder = {name: tensor for name, tensor in state.items() if not name.startswith(HEAD)}
    return state | _load_encoder(schema, config, encoder)


def _load_encoder(
    schema: Schema, config: RunConfig, expected: dict[str, Tensor]
) -> dict[str, Tensor]:
    where = f"init-checkpoint {config.init_checkpoint!r}"
    if schema.text is None:
        raise InitCheckpointError(
            f"{where}: task {config.task!r} is tabular and a pretrained checkpoint holds a text "
            'encoder; set init-checkpoint = "" (text tasks only: banking77, medical-text)'
        )
    path = resolve_checkpoint(config.init_checkpoint)
    scenario = "SCENARIO.toml" if config.task == "custom" else config.task
    remake = f"make one with `confide pretrain {scenario} --out {path}`"
    if not path.is_file():
        raise InitCheckpointError(
            f"{where}: no such file ({path}; a relative path is looked up in {CHECKPOINT_DIR}, "
            f"then the working directory); give an existing checkpoint or {remake}"
        )
    try:
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except (SafetensorError, OSError) as error:
        raise InitCheckpointError(
            f"{where}: {path} is not a checkpoint (not safetensors: {error}); {remake}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise InitCheckpointError(
            f"{where}: {path} is not a pretrained checkpoint (its metadata lacks format "
            f"{FORMAT!r}); {remake}"
        )
    _check_architecture(where, metadata, config, scenario)
    _check_tensors(where, path, tensors, expected, remake)
    return {name: tensors[name] for name in expected}


def _check_architecture(
    where: str, metadata: dict[str, str], config: RunConfig, scenario: str
) -> None:
    ours = architecture(config)
    differ = [key for key in ARCHITECTURE if metadata.get(key) != ours[key]]
    if differ:
        found = ", ".join(
            f"{key} {metadata.get(key, 'missing')} (run: {ours[key]})" for key in differ
        )
        theirs = " ".join(f"--set {key}={metadata.get(key)}" for key in differ)
        mine = " ".join(f"--set {key}={ours[key]}" for key in differ)
        raise InitCheckpointError(
            f"{where}: made for another architecture: {found}; run with {theirs}, or pretrain "
            f"one for this run: `confide pretrain {scenario} {mine} --out NEW.safetensors`"
        )


def _check_tensors(
    where: str, path: Path, tensors: dict[str, Tensor], expected: dict[str, Tensor], remake: str
) -> None:
    """Every encoder tensor present, with the global model's shape and dtype (sites' updates are
    screened against them) and finite values; a tensor the model lacks means another model."""
    problems = [_tensor_problem(name, tensors.get(name), want) for name, want in expected.items()]
    problems += [
        f"{name} unexpected"
        for name in tensors
        if name not in expected and not name.startswith(HEAD)
    ]
    found = [problem for problem in problems if problem]
    if found:
        more = f" and {len(found) - MAX_NAMED} more" if len(found) > MAX_NAMED else ""
        raise InitCheckpointError(
            f"{where}: {path} is incomplete or altered ({', '.join(found[:MAX_NAMED])}{more}); "
            f"{remake}"
        )


def _tensor_problem(name: str, stored: Tensor | None, want: Tensor) -> str:
    if stored is None:
        return f"{name} missing"
    if (stored.shape, stored.dtype) != (want.shape, want.dtype):
        return f"{name} {tuple(stored.shape)} {stored.dtype}, expected {tuple(want.shape)} {want.dtype}"
    return "" if torch.isfinite(stored).all() else f"{name} not finite"
