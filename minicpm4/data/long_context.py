"""Long-context training data and pass-key needles (spec §2.3 long-sparse stage; issue 4 #6).

`minicpm4 data long-context` turns a `data tokenize` folder of long documents (books) into a
shard folder whose documents are **exactly seq_len tokens** each: ``BOS`` + consecutive book
tokens. The loader's window i is then document i exactly (its one extra target, the next BOS,
is ignored as a cross-document label), so every training row is one document, which InfLLM v2
sparse attention requires (it does not take packed documents).

A `passkey_fraction` of the chunks carry a planted retrieval task (the classic pass-key test,
a random 5-digit number):

    BOS  book...  NEEDLE  book...  QUESTION KEY

with NEEDLE = " The pass key is K. Remember it. K is the pass key." at a uniformly random depth
of the book text and QUESTION = " What is the pass key? The pass key is", KEY = " K" (a space
token then one token per digit with the MiniCPM4 tokenizer). `benchmarks/long_context_retrieval.py`
builds its cases with the same `passkey_parts` / `plant` from a held-out book and other keys.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from minicpm4.data.tokenize import (DEFAULT_TOKENIZER, FORMAT, INDEX_NAME, OFFSET_DTYPE,
                                    TOKEN_DTYPE, VERSION, _commit, _ShardWriter,
                                    _tokenizer_info, _write_json_atomic, iter_shard_documents,
                                    read_index)
from minicpm4.tokenizer import Tokenizer

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyParts:
    """Token ids (no BOS) of one pass-key task."""

    needle: np.ndarray
    question: np.ndarray
    answer: np.ndarray
    """" K": the space token then the key's digit tokens; scored digits are `answer[1:]`."""


def random_key(rng: np.random.Generator) -> int:
    """A uniformly random 5-digit number (10000-99999)."""
    return int(rng.integers(10000, 100000))


def passkey_parts(tok: Tokenizer, key: int) -> PasskeyParts:
    enc = lambda text: np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.int64)
    return PasskeyParts(needle=enc(NEEDLE.format(key=key)), question=enc(QUESTION),
                        answer=enc(f" {key}"))


def plant(hay: np.ndarray, parts: PasskeyParts, depth: float, *, bos: int,
          length: int) -> tuple[np.ndarray, int]:
    """``BOS hay[:a] needle hay[a:n] question answer`` of exactly `length` tokens, the needle
    at `depth` (0..1) of the n hay tokens used. Returns (ids, index of the needle's first token).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    n = length - 1 - len(parts.needle) - len(parts.question) - len(parts.answer)
    if n < 0 or len(hay) < n:
        raise ValueError(f"need {max(n, 0)} hay tokens for a {length}-token case, have {len(hay)}")
    a = int(round(depth * n))
    ids = np.concatenate([[bos], hay[:a], parts.needle, hay[a:n], parts.question, parts.answer])
    return ids.astype(np.int64), 1 + a


def build_long_context_folder(source: str | Path, out: str | Path, *, seq_len: int,
                              passkey_fraction: float = 0.5, seed: int = 0,
                              tokenizer: str | Path | None = None,
                              progress: Callable[[str], None] | None = None) -> Path:
    """Write `out` (a shard folder `TokenLoader` reads) from the documents of `source`.

    Each document of `source` (BOS ... EOS) is cut into consecutive pieces of seq_len - 1
    tokens (the tail is dropped); each piece becomes ``BOS + piece`` or, with probability
    `passkey_fraction`, a pass-key chunk built from the piece. Deterministic in `seed`.
    """
    if type(seq_len) is not int or seq_len < 64:
        raise ValueError(f"seq_len must be an int >= 64, got {seq_len!r}")
    if not 0.0 <= passkey_fraction <= 1.0:
        raise ValueError(f"passkey_fraction must lie in [0, 1], got {passkey_fraction}")
    src_index = read_index(source)
    tok = Tokenizer.from_pretrained(DEFAULT_TOKENIZER if tokenizer is None else tokenizer)
    bos = int(src_index["bos_id"])
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writer = _ShardWriter(tmp, max_shard_tokens=1 << 26)
    counts = {"plain": 0, "passkey": 0}
    try:
        for doc in iter_shard_documents(source):
            body = np.asarray(doc[1:-1], dtype=np.int64)  # strip BOS / EOS
            for lo in range(0, len(body) - (seq_len - 1) + 1, seq_len - 1):
                piece = body[lo:lo + seq_len - 1]
                if rng.random() < passkey_fraction:
                    parts = passkey_parts(tok, random_key(rng))
                    ids, _ = plant(piece, parts, float(rng.random()), bos=bos, length=seq_len)
                    counts["passkey"] += 1
                else:
                    ids = np.concatenate([[bos], piece])
                    counts["plain"] += 1
                writer.add(ids.astype(TOKEN_DTYPE))
        shards = writer.finish()
        if not shards:
            raise ValueError(f"no document of {source} holds {seq_len - 1} tokens")
        index = {"format": FORMAT, "version": VERSION, "dtype": TOKEN_DTYPE.str,
                 "offsets_dtype": OFFSET_DTYPE.str, "bos_id": bos,
                 "eos_id": int(src_index["eos_id"]), "tokenizer": _tokenizer_info(tok),
                 "max_shard_tokens": 1 << 26, "num_skipped_empty": 0,
                 "num_documents": sum(s["num_documents"] for s in shards),
                 "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards,
                 "sources": [{"path": str(source), "split": "train",
                              "num_documents": src_index["num_documents"],
                              "num_tokens": src_index["num_tokens"]}],
                 "long_context": {"seq_len": seq_len, "passkey_fraction": passkey_fraction,
                                  "seed": seed, **counts},
                 "content_sha256": writer.content.hexdigest()}
        _write_json_atomic(tmp / INDEX_NAME, index)
        _commit(tmp, out)
    finally:
        writer.abort()
        if tmp.exists():
            shutil.rmtree(tmp)
    if progress:
        progress(f"{out}: {counts['plain'] + counts['passkey']} chunks of {seq_len} tokens "
                 f"({counts['passkey']} with a pass key)")
    return out
