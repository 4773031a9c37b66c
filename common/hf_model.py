"""A site's own pretrained text encoder: a Hugging Face checkpoint read from local disk only.

`model = "hf:NAME"` names a directory under the models directory (`$CONFIDE_MODELS_DIR`, else
data/models/ of the installed project), never a path: the coordinator only names a model, each
site loads its own installed copy, and cannot be pointed at any other file on the site's disk.
The directory is what `save_pretrained` writes for a model and its tokenizer; weights must be
safetensors (no pickle, so loading one runs no code). Nothing is ever downloaded
(`local_files_only`). The encoder stays frozen; LoRA adapters and the classification head train
and travel (common/lora.py). `transformers` is the `hf` extra and is imported only here, only
when a run names such a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from common.run_config import PROJECT_ROOT, RunConfig
from common.schema import Schema
from common.site_data import TextEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HF_PREFIX = "hf:"
MODELS_DIR_ENV = "CONFIDE_MODELS_DIR"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model")  # any one will do
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HFModelError(ValueError):
    """A Hugging Face model the run cannot use; the message names the setting or path and the fix."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or PROJECT_ROOT / "data" / "models")


def hf_model_name(config: RunConfig) -> str | None:
    """The setting `hf:NAME` or `hf:NAME@SHA256` when the run uses a Hugging Face checkpoint."""
    return config.model.removeprefix(HF_PREFIX) if config.model.startswith(HF_PREFIX) else None


def pin_hf_model(config: RunConfig) -> RunConfig:
    """`config` with its Hugging Face model pinned to the sha256 of the coordinator's copy, for a
    run submitted to sites: every side must build the same frozen base, or the adapters they
    average would mean different things. A site whose copy differs refuses the run."""
    name = hf_model_name(config)
    if name is None or "@" in name:
        return config
    return dataclasses.replace(config, model=f"{HF_PREFIX}{name}@{hf_digest(name)}")


def hf_directory(pinned: str) -> Path:
    """The installed checkpoint `NAME[@SHA256]`, checked for the files a model and its tokenizer
    need and, when pinned, against the digest of the coordinator's copy."""
    name, _, digest = pinned.partition("@")
    directory = _installed(name)
    if digest and hf_digest(name) != digest:
        raise HFModelError(
            f"model 'hf:{name}': this side's copy {directory} (sha256 {hf_digest(name)[:16]}...) "
            f"is not the coordinator's (sha256 {digest[:16]}...); install the same checkpoint "
            "on every side"
        )
    return directory


def _where(pinned: str) -> str:
    return f"model 'hf:{pinned.partition('@')[0]}'"


def _installed(name: str) -> Path:
    where = _where(name)
    if not _NAME.fullmatch(name):
        raise HFModelError(
            f"{where}: give the name of a directory in the models directory ({models_dir()}), "
            "not a path; install the checkpoint there (copy or link it) on every side"
        )
    directory = models_dir() / name
    install = (
        f"install it with `model.save_pretrained(DIR, safe_serialization=True)` and "
        f"`tokenizer.save_pretrained(DIR)` into {directory} (or set {MODELS_DIR_ENV})"
    )
    if not directory.is_dir():
        raise HFModelError(f"{where}: no directory {directory}; {install}")
    missing = [file for file in ("config.json", WEIGHTS) if not (directory / file).is_file()]
    if not any((directory / file).is_file() for file in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        pickled = " (pytorch_model.bin is not read: pickle runs code)" if WEIGHTS in missing else ""
        raise HFModelError(
            f"{where}: {directory} is incomplete, missing {', '.join(missing)}{pickled}; {install}"
        )
    return directory


def _quiet_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise HFModelError(
            "a model = 'hf:NAME' run needs the hf extra on every side: pip install 'confide[hf]'"
        ) from None

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@lru_cache(maxsize=4)
def hf_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, checked against its model: an id past the embedding table
    would fail mid-round, or read another word's vector."""
    directory = hf_directory(name)
    transformers = _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        vocab_size = transformers.AutoConfig.from_pretrained(directory).vocab_size
    except (OSError, ValueError, KeyError) as error:
        raise HFModelError(f"{_where(name)}: {directory} cannot be read ({error})") from None
    if len(tokenizer) > vocab_size:
        raise HFModelError(
            f"{_where(name)}: its tokenizer has {len(tokenizer)} tokens but the model embeds "
            f"{vocab_size}: they belong to different checkpoints; save the model's own tokenizer "
            f"into {directory}"
        )
    return tokenizer


def hf_text_encoder(model: str, max_length: int) -> TextEncoder | None:
    """For a run on a Hugging Face model (the `model` setting), what turns texts into its token
    ids and mask (on the site, as the hashing tokenizer does); else None."""
    if not model.startswith(HF_PREFIX):
        return None
    name = model.removeprefix(HF_PREFIX)
    tokenizer = hf_tokenizer(name)

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        return ids, np.asarray(batch["attention_mask"], dtype=bool)

    return encode


class HFTextClassifier(nn.Module):
    """A Hugging Face encoder, mean-pooled over real tokens, then a linear head: the same
    interface as common/models.py's TextTransformer (token ids and mask in, logits out)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's layers, where LoRA looks for its target Linears."""
        layers = self.encoder.config.num_hidden_layers
        for module in self.encoder.modules():
            if isinstance(module, nn.ModuleList) and len(module) == layers:
                return module
        raise HFModelError(
            f"{type(self.encoder).__name__} keeps no list of its {layers} layers for LoRA to "
            "adapt; use a BERT-, RoBERTa- or DistilBERT-like encoder"
        )

    def forward(self, token_ids: Tensor, padding_mask: Tensor) -> Tensor:
        mask = padding_mask.to(torch.long)
        hidden = self.encoder(input_ids=token_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def build_hf_classifier(schema: Schema, config: RunConfig, pretrained: bool) -> HFTextClassifier:
    """The architecture alone (`pretrained=False`: for names and shapes, no weights read), or
    with the checkpoint's weights, which must fit the architecture exactly."""
    pinned = hf_model_name(config)
    assert pinned is not None
    if schema.text is None:
        raise HFModelError(
            f"model {config.model!r}: task {config.task!r} is tabular and a Hugging Face model "
            "encodes text; set model = 'builtin'"
        )
    num_classes = len(schema.classes)
    directory, where = hf_directory(pinned), _where(pinned)
    hf_tokenizer(pinned)
    transformers = _quiet_transformers()
    try:
        settings = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise HFModelError(f"{where}: {directory}/config.json cannot be read ({error})") from None
    if settings.is_encoder_decoder or not hasattr(settings, "num_hidden_layers"):
        raise HFModelError(
            f"{where}: {settings.model_type} is not an encoder with layers; use an encoder "
            "checkpoint (BERT-, RoBERTa- or DistilBERT-like)"
        )
    if not pretrained:
        return HFTextClassifier(transformers.AutoModel.from_config(settings), num_classes)
    try:
        encoder, loading = transformers.AutoModel.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise HFModelError(f"{where}: {directory} cannot be loaded ({error})") from None
    wrong = [str(key) for key in (*loading["missing_keys"], *loading["mismatched_keys"])]
    if wrong:
        raise HFModelError(
            f"{where}: {directory}/{WEIGHTS} does not fit its config.json (missing or misshapen: "
            f"{', '.join(sorted(wrong)[:3])}); save model and config together with "
            "save_pretrained"
        )
    return HFTextClassifier(encoder, num_classes)


@lru_cache(maxsize=4)
def hf_digest(name: str) -> str:
    """sha256 over the checkpoint's config, weights and tokenizer files, read in chunks: a
    clinical BERT's weights are hundreds of megabytes."""
    directory = _installed(name)
    digest = hashlib.sha256()
    for file in ("config.json", WEIGHTS, *TOKENIZER_FILES):
        path = directory / file
        if path.is_file():
            digest.update(file.encode() + b"\0")
            with path.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()
