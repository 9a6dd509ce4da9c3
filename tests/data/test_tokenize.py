"""`data/tokenize.py` and `minicpm4 data tokenize`: round trip, determinism, holdout, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minicpm4.cli import build_parser, main
from minicpm4.data.tokenize import (iter_documents, iter_shard_documents, read_index,
                                    resolve_inputs, tokenize_corpus)
from tests.data import expected_text, load_tokenizer, random_texts, real_book, write_jsonl

TXT_A = " Leading space, then\r\nWindows newlines and trailing spaces  "
TXT_B = "Unicode: café 東京 🙂\n\ttabs\n\n"
JSONL = ["first document", "", "third: «quotes» and \"escapes\"\n", " x"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TXT_A, encoding="utf-8", newline="")
    (src / "sub" / "b.txt").write_text(TXT_B, encoding="utf-8")
    write_jsonl(src / "c.jsonl", JSONL)
    (src / "c.jsonl").write_text((src / "c.jsonl").read_text() + "\n  \n", encoding="utf-8")
    (src / "notes.md").write_text("ignored: not .txt/.jsonl")
    return src


def _tokenize(inputs, out, **kw):
    return tokenize_corpus([str(p) for p in inputs], out, tokenizer=load_tokenizer(), **kw)


def _decoded(folder: Path) -> list[str]:
    tok = load_tokenizer()
    docs = list(iter_shard_documents(folder))
    for doc in docs:
        assert doc[0] == tok.bos_token_id == 1 and doc[-1] == 2
        assert 1 not in doc[1:].tolist() and 2 not in doc[:-1].tolist()
    return [tok.decode(doc[1:-1].tolist(), skip_special_tokens=False) for doc in docs]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_txt_and_jsonl(corpus: Path, tmp_path: Path) -> None:
    out = _tokenize([corpus], tmp_path / "out")
    assert list(out) == ["train"]
    index = read_index(out["train"])
    sources = ["a.txt", "c.jsonl", "b.txt"]  # sorted paths: a.txt < c.jsonl < sub/b.txt
    assert [Path(s["path"]).name for s in index["sources"]] == sources
    texts = [TXT_A, *[t for t in JSONL if t], TXT_B]
    assert _decoded(out["train"]) == [expected_text(t) for t in texts]
    assert index["num_documents"] == 5 and index["num_skipped_empty"] == 1
    assert index["num_tokens"] == sum(s["num_tokens"] for s in index["sources"])
    assert index["bos_id"] == 1 and index["eos_id"] == 2 and index["dtype"] == "<u4"
    assert index["tokenizer"]["vocab_size"] == 73448 and len(index["tokenizer"]["sha256"]) == 64
    tokens = np.fromfile(out["train"] / "shard-00000.bin", dtype="<u4")
    offsets = np.fromfile(out["train"] / "shard-00000.idx", dtype="<u8")
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == index["num_tokens"]
    assert (tokens[offsets[:-1]] == 1).all() and (tokens[offsets[1:] - 1] == 2).all()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train"]  # no temp folders left


def test_real_book_round_trip(tmp_path: Path) -> None:
    book = real_book()
    out = _tokenize([book], tmp_path / "out")
    text = book.read_text(encoding="utf-8-sig")
    (doc,) = list(iter_shard_documents(out["train"]))
    assert doc.tolist() == load_tokenizer().encode(text) + [2]  # encode adds the BOS
    assert _decoded(out["train"]) == [expected_text(text)]


def test_rerun_writes_the_same_bytes(corpus: Path, tmp_path: Path) -> None:
    first = _tokenize([corpus], tmp_path / "out", holdout=["b"], max_shard_tokens=40)
    before = {s: _folder_bytes(f) for s, f in first.items()}
    again = _tokenize([corpus], tmp_path / "out", holdout=["b"], max_shard_tokens=40)
    assert {s: _folder_bytes(f) for s, f in again.items()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval", "train"]
    other = _tokenize([corpus], tmp_path / "other", holdout=["b"], max_shard_tokens=40)
    assert {s: _folder_bytes(f) for s, f in other.items()} == before


def test_max_shard_tokens_splits_between_documents(tmp_path: Path) -> None:
    texts = random_texts(30, seed=1)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    whole = read_index(_tokenize([src], tmp_path / "one")["train"])
    limit = 120
    folder = _tokenize([src], tmp_path / "many", max_shard_tokens=limit)["train"]
    index = read_index(folder)
    assert len(index["shards"]) > 3 and len(whole["shards"]) == 1
    for shard in index["shards"]:
        assert shard["num_tokens"] <= limit or shard["num_documents"] == 1
    assert [d.tolist() for d in iter_shard_documents(folder)] == \
        [d.tolist() for d in iter_shard_documents(tmp_path / "one" / "train")]
    assert index["num_tokens"] == whole["num_tokens"]
    assert index["content_sha256"] != whole["content_sha256"]  # the layout is part of the content
    tiny = read_index(_tokenize([src], tmp_path / "tiny", max_shard_tokens=1)["train"])
    assert len(tiny["shards"]) == 30  # each document longer than the cap gets its own shard


def test_holdout_goes_to_a_separate_folder(corpus: Path, tmp_path: Path) -> None:
    out = _tokenize([corpus], tmp_path / "out", holdout=["c.jsonl", "b"])
    assert _decoded(out["eval"]) == [expected_text(t) for t in (*[t for t in JSONL if t], TXT_B)]
    assert _decoded(out["train"]) == [expected_text(TXT_A)]
    assert {Path(s["path"]).name for s in read_index(out["eval"])["sources"]} == {"c.jsonl", "b.txt"}
    with pytest.raises(ValueError, match="names no input file: nope"):
        _tokenize([corpus], tmp_path / "out", holdout=["nope"])
    with pytest.raises(ValueError, match="every input file is held out"):
        _tokenize([corpus / "a.txt"], tmp_path / "out", holdout=[str(corpus / "a.txt")])
    _tokenize([corpus], tmp_path / "out")  # no holdout now: the stale eval folder goes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


def test_jsonl_text_key_and_blank_lines(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "k.jsonl", ["alpha", "beta"], key="content")
    docs = list(iter_documents(src, text_key="content"))
    assert [(d.line, d.text) for d in docs] == [(1, "alpha"), (2, "beta")]
    with pytest.raises(ValueError, match=r"k\.jsonl:1: no 'text' key"):
        list(iter_documents(src))
    # lines end at "\n" only: CRLF is fine, U+2028 inside a string does not split a record
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes('\ufeff{"text": "a\u2028b"}\r\n\r\n{"text": "c"}\r\n'.encode("utf-8"))
    assert [(d.line, d.text) for d in iter_documents(crlf)] == [(1, "a\u2028b"), (3, "c")]
    crlf.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"crlf\.jsonl:2: not valid UTF-8"):
        list(iter_documents(crlf))


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:2: invalid JSON"),
    (['{"text": "ok"}', "", '["not", "an object"]'], r"bad\.jsonl:3: expected a JSON object"),
    (['{"body": "x"}'], r"bad\.jsonl:1: no 'text' key"),
    (['{"text": 3}'], r"bad\.jsonl:1: 'text' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        _tokenize([src], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the temp folder is removed


def test_input_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input not found: .*missing.txt"):
        resolve_inputs([corpus / "missing.txt"])
    with pytest.raises(ValueError, match="no .txt or .jsonl file matches"):
        resolve_inputs([str(corpus / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl file in directory"):
        resolve_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="unsupported file type"):
        resolve_inputs([corpus / "notes.md"])
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 \(byte 3\)"):
        list(iter_documents(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="max_shard_tokens"):
        _tokenize([corpus], tmp_path / "out", max_shard_tokens=0)
    files = resolve_inputs([str(corpus / "*.txt"), corpus, corpus / "a.txt"])
    assert [p.name for p in files] == ["a.txt", "c.jsonl", "b.txt"]  # de-duplicated, ordered


def test_empty_corpus_keeps_the_previous_output(corpus: Path, tmp_path: Path) -> None:
    out = _tokenize([corpus], tmp_path / "out")
    before = _folder_bytes(out["train"])
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match="empty corpus"):
        _tokenize([empty], tmp_path / "out")
    assert _folder_bytes(out["train"]) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


def test_read_index_checks_the_files(corpus: Path, tmp_path: Path) -> None:
    folder = _tokenize([corpus], tmp_path / "out")["train"]
    with pytest.raises(ValueError, match="no index.json"):
        read_index(tmp_path)
    with open(folder / "shard-00000.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="shard-00000.bin: missing or not"):
        read_index(folder)
    (folder / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a minicpm4-token-shards v1 index"):
        read_index(folder)


@pytest.mark.parametrize("cmd", [["data"], ["data", "tokenize"]])
def test_cli_help(cmd: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*cmd, "--help"])
    assert exc.value.code == 0 and "usage: minicpm4 data" in capsys.readouterr().out


def test_cli_tokenize(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["data", "tokenize", str(corpus / "*.txt"), str(corpus / "c.jsonl"), "--out", str(out),
            "--holdout", "a.txt", "--max-shard-tokens", "50", "--text-key", "text"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[1/2]" in captured.err and "-> eval" in captured.err and "tokenized in" in captured.err
    assert f"train: {out / 'train'}" in captured.out and f"eval: {out / 'eval'}" in captured.out
    assert read_index(out / "eval")["num_documents"] == 1
    assert main(["data", "tokenize", str(corpus / "nope.txt"), "--out", str(out)]) == 2
    assert "error: input not found" in capsys.readouterr().err
