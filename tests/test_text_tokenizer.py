"""The hashing tokenizer: same ids in every process, sane masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from common.text_tokenizer import EMPTY_ID, PAD_ID, encode_texts, token_id, tokenize

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The patient reported chest pain.", "Card not working!", "Ünïcode wörds, 42 times"]


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    assert tokenize("Chest PAIN, again!") == ["chest", "pain", ",", "again", "!"]


def test_token_id_is_crc32_bucket_above_reserved_ids() -> None:
    expected = 2 + zlib.crc32(b"pain") % (100 - 2)
    assert token_id("pain", 100) == expected
    ids, _ = encode_texts(["PAIN"], vocab_size=100, max_length=4)
    assert ids[0, 0] == expected


def test_ids_stay_within_vocab_and_never_use_reserved_ids() -> None:
    ids, mask = encode_texts(TEXTS * 50, vocab_size=7, max_length=16)
    assert ids[mask].min() >= 2
    assert ids.max() < 7


def test_ids_are_identical_in_other_processes() -> None:
    """Python's hash() would differ per process; CRC-32 must not."""
    script = (
        "import json, sys\n"
        "from common.text_tokenizer import encode_texts\n"
        "ids, mask = encode_texts(json.loads(sys.argv[1]), vocab_size=8192, max_length=12)\n"
        "print(json.dumps([ids.tolist(), mask.tolist()]))\n"
    )
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(TEXTS)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
        ).stdout
        results.append(json.loads(out))
    ids, mask = encode_texts(TEXTS, vocab_size=8192, max_length=12)
    assert results[0] == results[1] == [ids.tolist(), mask.tolist()]


def test_shapes_and_dtypes() -> None:
    ids, mask = encode_texts(TEXTS, vocab_size=50, max_length=10)
    assert ids.shape == mask.shape == (3, 10)
    assert ids.dtype == np.int64
    assert mask.dtype == np.bool_


def test_mask_marks_real_tokens_and_padding_is_zero() -> None:
    ids, mask = encode_texts(["one two three"], vocab_size=50, max_length=5)
    assert mask[0].tolist() == [True, True, True, False, False]
    assert ids[0, 3:].tolist() == [PAD_ID, PAD_ID]


def test_long_text_is_truncated_to_max_length() -> None:
    ids, mask = encode_texts(["a b c d e f g"], vocab_size=50, max_length=3)
    assert mask[0].all()
    expected, _ = encode_texts(["a b c"], vocab_size=50, max_length=3)
    assert ids.tolist() == expected.tolist()


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_text_without_tokens_gets_one_real_token(text: str) -> None:
    ids, mask = encode_texts([text], vocab_size=50, max_length=4)
    assert mask[0].tolist() == [True, False, False, False]
    assert ids[0, 0] == EMPTY_ID


def test_composed_and_decomposed_accents_get_the_same_id() -> None:
    ids, _ = encode_texts(["caf\u00e9", "cafe\u0301"], vocab_size=1000, max_length=2)
    assert ids[0, 0] == ids[1, 0]


@pytest.mark.parametrize(("vocab_size", "max_length"), [(2, 4), (50, 0)])
def test_rejects_unusable_sizes(vocab_size: int, max_length: int) -> None:
    with pytest.raises(ValueError):
        encode_texts(["x"], vocab_size=vocab_size, max_length=max_length)
