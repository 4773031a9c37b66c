"""Central pretraining of a task's text encoder on a public corpus (`confide pretrain`).

It lives beside the simulator because it too runs on the data scientist's machine before a
federation, and it trains with the very loop the sites run (`client.training`), so pretraining
and fine-tuning differ only in their data. The corpus gets its own head (150 CLINC intents, not
the task's classes); the federation replaces it (`common.pretrained_checkpoint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.training import choose_device, make_optimizer, train_epochs
from common.evaluation import evaluate, make_loader
from common.model_factory import build_text_model
from common.pretrained_checkpoint import save_pretrained
from common.public_corpus import load_corpus
from common.run_config import RunConfig


@dataclass(frozen=True)
class PretrainingResult:
    corpus: str
    corpus_sha256: str
    train_queries: int
    validation_queries: int
    validation_accuracy: float
    seconds: float
    checkpoint: Path


def pretrain(
    config: RunConfig,
    corpus_name: str,
    out: Path,
    epochs: int,
    seed: int,
    max_queries: int | None = None,
) -> PretrainingResult:
    """Train `config`'s text encoder on the corpus' train split (all of it, or `max_queries` drawn
    by `seed`), report validation accuracy, write the checkpoint to `out` atomically."""
    started = time.perf_counter()
    corpus = load_corpus(corpus_name, config.vocab_size, config.max_length)
    train = corpus.train
    if max_queries is not None and max_queries < len(train):
        train = train.subset(np.random.default_rng(seed).permutation(len(train))[:max_queries])
    torch.manual_seed(seed)
    model = build_text_model(config, len(corpus.intents))
    optimizer = make_optimizer(config.optimizer, model, config.learning_rate, config.weight_decay)
    device = choose_device()
    loader = make_loader(train, config.batch_size, shuffle=True, seed=seed)
    train_epochs(model, loader, optimizer, epochs, device)
    accuracy = evaluate(model, corpus.validation, batch_size=256, device=device).accuracy
    facts = {
        "corpus": corpus.name,
        "corpus-sha256": corpus.sha256,
        "train-queries": str(len(train)),
        "epochs": str(epochs),
        "seed": str(seed),
        "optimizer": config.optimizer,
        "learning-rate": str(config.learning_rate),
        "batch-size": str(config.batch_size),
        "validation-accuracy": f"{accuracy:.4f}",
    }
    save_pretrained(model.cpu(), out, config, facts)
    return PretrainingResult(
        corpus.name,
        corpus.sha256,
        len(train),
        len(corpus.validation),
        accuracy,
        time.perf_counter() - started,
        out,
    )
