"""`data/long_context.py`: exact-length chunks (one document per training row, as InfLLM v2
training needs), planted pass keys, determinism and errors (issue 4 acceptance 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minicpm4.cli import main
from minicpm4.data.loader import TokenLoader
from minicpm4.data.long_context import (build_long_context_folder, passkey_parts, plant,
                                        random_key)
from minicpm4.data.tokenize import iter_shard_documents, read_index, tokenize_corpus
from tests.data import load_tokenizer, random_texts, write_jsonl

SEQ = 128


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("books")
    texts = [" ".join(random_texts(40, seed=s)) for s in range(3)]  # ~1-2K tokens each
    write_jsonl(tmp / "books.jsonl", texts)
    return tokenize_corpus([tmp / "books.jsonl"], tmp / "tok", tokenizer=load_tokenizer())["train"]


def test_passkey_parts_and_plant() -> None:
    tok = load_tokenizer()
    parts = passkey_parts(tok, 48213)
    assert tok.decode(parts.answer.tolist()).strip() == "48213" and len(parts.answer) == 6
    hay = np.arange(1000, 1400)
    ids, at = plant(hay, parts, 0.5, bos=1, length=300)
    assert len(ids) == 300 and ids[0] == 1
    assert np.array_equal(ids[at:at + len(parts.needle)], parts.needle)
    assert np.array_equal(ids[-len(parts.answer):], parts.answer)
    n = 300 - 1 - len(parts.needle) - len(parts.question) - len(parts.answer)
    assert at == 1 + round(0.5 * n)
    with pytest.raises(ValueError, match="depth"):
        plant(hay, parts, 1.5, bos=1, length=300)
    with pytest.raises(ValueError, match="hay tokens"):
        plant(hay[:10], parts, 0.5, bos=1, length=300)
    rng = np.random.default_rng(0)
    assert all(10000 <= random_key(rng) <= 99999 for _ in range(100))


def test_chunks_are_single_documents_with_keys(books: Path, tmp_path: Path) -> None:
    out = build_long_context_folder(books, tmp_path / "lc", seq_len=SEQ, passkey_fraction=0.5,
                                    seed=3, tokenizer=load_tokenizer().name_or_path)
    docs = [np.asarray(d) for d in iter_shard_documents(out)]
    info = read_index(out)["long_context"]
    assert len(docs) == info["plain"] + info["passkey"] and info["passkey"] > 0 < info["plain"]
    assert all(len(d) == SEQ and d[0] == 1 for d in docs)
    tok = load_tokenizer()
    with_key = [d for d in docs if "The pass key is" in tok.decode(d.tolist())]
    assert len(with_key) == info["passkey"]
    for d in with_key:
        assert "What is the pass key? The pass key is" in tok.decode(d[-20:].tolist())
    loader = TokenLoader(out, SEQ, 1, shuffle=False)
    for i in range(loader.num_sequences):
        inputs = loader.sequence(i).model_inputs()
        assert set(inputs["doc_ids"].tolist()) == {0} and inputs["positions"][-1] == SEQ - 1
    again = build_long_context_folder(books, tmp_path / "lc2", seq_len=SEQ,
                                      passkey_fraction=0.5, seed=3,
                                      tokenizer=load_tokenizer().name_or_path)
    assert read_index(again)["content_sha256"] == read_index(out)["content_sha256"]


def test_cli_errors(books: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "long-context", str(books), "--out", str(tmp_path / "x"),
                 "--seq-len", "8"]) == 2
    assert "seq_len" in capsys.readouterr().err
    assert main(["data", "long-context", str(books), "--out", str(tmp_path / "x"),
                 "--seq-len", "128", "--passkey-fraction", "2"]) == 2
    assert "passkey_fraction" in capsys.readouterr().err
