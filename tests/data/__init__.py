"""Tests of `minicpm4/data/` (architecture §5 `tests/data/`); shared helpers for its modules."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from minicpm4.data.tokenize import DEFAULT_TOKENIZER
from minicpm4.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GUTENBERG = SHARED_DATA / "gutenberg"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum songs of "
         "ancient rivers, mountains and cities; über café naïve 東京 🙂").split()


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """The bundled MiniCPM4 tokenizer, loaded once per test session (about 2 s)."""
    return Tokenizer.from_pretrained(DEFAULT_TOKENIZER)


def random_texts(n: int, *, seed: int, max_words: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words)))) + "."
            for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], *, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def real_book(name: str = "blake-poems.txt") -> Path:
    path = GUTENBERG / name
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


def expected_text(text: str) -> str:
    """What decoding a document's tokens gives back: the tokenizer (legacy Metaspace) prepends
    '▁' to text and decoding strips one leading space, so one leading space is lost."""
    return text[1:] if text.startswith(" ") else text
