"""Public text corpora a federation may pretrain on, shipped in `data/` (nothing is downloaded).

A corpus is public by licence, never a site's records: training on it centrally costs no site any
privacy, which is why it may shape the encoder before private fine-tuning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.site_data import EncodedDataset
from common.tasks import DATA_DIR
from common.text_tokenizer import encode_texts

CORPORA = {"clinc150": DATA_DIR / "clinc150" / "data_full.json.gz"}


class CorpusError(ValueError):
    """A corpus name that is not shipped, or a shipped file that cannot be read."""


@dataclass(frozen=True)
class Corpus:
    name: str
    sha256: str  # of the published file's bytes (decompressed), as its README lists it
    intents: tuple[str, ...]
    train: EncodedDataset
    validation: EncodedDataset


def load_corpus(name: str, vocab_size: int, max_length: int) -> Corpus:
    """The corpus' train and validation splits, encoded by the same hashing tokenizer the
    federation uses (it has no vocabulary, so pretraining and fine-tuning share it)."""
    if name not in CORPORA:
        raise CorpusError(
            f"--corpus {name!r}: not a shipped corpus; use one of {', '.join(CORPORA)}"
        )
    sha256, splits = _read_splits(CORPORA[name])
    intents = tuple(sorted({intent for _, intent in splits["train"]}))
    index = {intent: number for number, intent in enumerate(intents)}

    def encode(split: str) -> EncodedDataset:
        queries = [(text, intent) for text, intent in splits[split] if intent in index]
        ids, mask = encode_texts([text for text, _ in queries], vocab_size, max_length)
        labels = np.array([index[intent] for _, intent in queries], dtype=np.int64)
        return EncodedDataset((ids, mask), labels)

    return Corpus(name, sha256, intents, encode("train"), encode("val"))


@lru_cache(maxsize=2)
def _read_splits(path: Path) -> tuple[str, dict[str, list[list[str]]]]:
    try:
        raw = gzip.decompress(path.read_bytes())
        return hashlib.sha256(raw).hexdigest(), json.loads(raw)
    except (OSError, EOFError, ValueError) as error:
        raise CorpusError(
            f"{path}: cannot read the corpus ({error}); restore it from git"
        ) from None
