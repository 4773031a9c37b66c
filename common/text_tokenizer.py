"""A tokenizer that needs no training data.

A vocabulary learned from one site's text would ship that site's words to every other
site inside the model config, so words are hashed into a fixed number of buckets instead.
The hash is CRC-32, not Python's ``hash()``, which is salted per process and would give
every client (and every restart) different ids for the same word.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np

PAD_ID = 0
"""Id of padding positions (mask False)."""

EMPTY_ID = 1
"""Reserved id; given to the single token of a text with no tokens so mean pooling has a
non-empty denominator."""

FIRST_WORD_ID = 2

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split into lowercase words and single punctuation marks.

    NFKC normalisation first, so the same word typed with composed or decomposed accents
    (which differ between operating systems and editors) gets the same id at every site.
    """
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def token_id(word: str, vocab_size: int) -> int:
    """Bucket of one (already tokenized) word; stable across processes and machines."""
    return FIRST_WORD_ID + zlib.crc32(word.encode("utf-8")) % (vocab_size - FIRST_WORD_ID)


def encode_texts(
    texts: Sequence[str], vocab_size: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``int64 [N, max_length]`` and mask ``bool [N, max_length]`` (True = real).

    Texts longer than ``max_length`` tokens are truncated. A text without tokens gets one
    ``EMPTY_ID`` token marked real, so no row has an all-False mask.
    """
    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"vocab_size must be at least {FIRST_WORD_ID + 1}, got {vocab_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    ids = np.zeros((len(texts), max_length), dtype=np.int64)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    cache: dict[str, int] = {}
    for row, text in enumerate(texts):
        words = tokenize(text)[:max_length]
        if not words:
            ids[row, 0] = EMPTY_ID
            mask[row, 0] = True
            continue
        for col, word in enumerate(words):
            tid = cache.get(word)
            if tid is None:
                tid = cache[word] = token_id(word, vocab_size)
            ids[row, col] = tid
        mask[row, : len(words)] = True
    return ids, mask
