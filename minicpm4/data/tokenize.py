"""Corpus -> memory-mapped token shards (architecture §3 `data/tokenize.py`, spec §5 pre-training data).

Inputs are files, directories (searched recursively) or glob patterns; ``.txt`` is one document
per file, ``.jsonl`` one document per line (a JSON object, the text under ``text_key``). Files
are read in sorted path order, so a re-run writes the same bytes.

Each document becomes ``BOS + encode(text) + EOS`` with BOS ``<s>`` (1) and EOS ``</s>`` (2):
``</s>`` is the pre-training document separator, while the tokenizer's own eos ``<|im_end|>``
(73440) ends a chat turn; both are in generation_config's eos list, so a model trained on these
shards stops on either. Text is encoded as is (no normalisation, a UTF-8 BOM at the start of a
file is dropped); special-token strings written in the text map to their ids, as the tokenizer
does everywhere. Document boundaries are stored in the index, never found by scanning for EOS.
Empty documents (text "") are skipped and counted.

Output folder layout (``out/train`` and, with ``holdout``, ``out/eval``)::

    shard-00000.bin   the token ids, little-endian uint32, documents back to back
    shard-00000.idx   document offsets in that shard, little-endian uint64, num_documents + 1
                      entries from 0 to num_tokens (document k = bin[idx[k]:idx[k+1]])
    index.json        format, version, dtype, bos/eos ids, tokenizer (name, backend,
                      vocab_size, sha256 of its files), num_documents, num_tokens,
                      num_skipped_empty, max_shard_tokens, shards [{tokens, offsets,
                      num_tokens, num_documents, sha256}], sources [{path, split,
                      num_documents, num_tokens}], content_sha256 (over every .bin and .idx)

A document never spans two shards; a new shard starts when the next document would take the
current one past ``max_shard_tokens`` (a longer document gets a shard of its own). A folder is
written under a temporary name and renamed into place once complete, index last.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from minicpm4.tokenizer import Tokenizer

__all__ = ["Document", "resolve_inputs", "iter_documents", "tokenize_corpus", "read_index",
           "iter_shard_documents", "DEFAULT_TOKENIZER", "DEFAULT_MAX_SHARD_TOKENS", "BOS_TOKEN",
           "EOS_TOKEN"]

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
DEFAULT_MAX_SHARD_TOKENS = 1 << 27  # 512 MiB of uint32 per shard
FORMAT, VERSION = "minicpm4-token-shards", 1
INDEX_NAME = "index.json"
TOKEN_DTYPE, OFFSET_DTYPE = np.dtype("<u4"), np.dtype("<u8")
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
SUFFIXES = (".txt", ".jsonl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")
_BATCH_DOCS, _BATCH_CHARS = 256, 1 << 22  # encode_batch granularity (memory vs parallelism)
_PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class Document:
    """One source document: its file, its 1-based line for JSONL (None for .txt), its text."""

    path: Path
    line: int | None
    text: str


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, directories (recursive, .txt/.jsonl only) and globs into a sorted-per-input,
    de-duplicated list of files. Raises ValueError for a missing path, an empty glob or
    directory, or a file of another type."""
    if isinstance(inputs, (str, Path)):
        raise ValueError("inputs must be a sequence of paths, not a single path")
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if _is_glob(text) and not Path(text).exists():
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in found if p.is_file() and p.suffix in SUFFIXES]
            if not found:
                raise ValueError(f"no .txt or .jsonl file matches {text!r}")
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"no .txt or .jsonl file in directory {text}")
        elif Path(text).is_file():
            if Path(text).suffix not in SUFFIXES:
                raise ValueError(f"{text}: unsupported file type (expected .txt or .jsonl)")
            found = [Path(text)]
        else:
            raise ValueError(f"input not found: {text}")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line, streamed: lines end at b"\\n" only
    (JSON strings may hold U+2028, which str.splitlines would cut at)."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line)") from exc
                if line.strip():
                    yield lineno, line
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc


def iter_documents(path: str | Path, *, text_key: str = "text") -> Iterator[Document]:
    """Documents of one .txt (one document) or .jsonl file (one per non-blank line).

    Raises ValueError naming the file (and line) for unreadable files, invalid JSON, a line
    that is not an object, or a missing / non-string ``text_key``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input not found: {path}")
    if path.suffix == ".txt":
        yield Document(path, None, _read_text(path))
        return
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported file type (expected .txt or .jsonl)")
    for lineno, line in _jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if text_key not in record:
            raise ValueError(f"{path}:{lineno}: no {text_key!r} key (keys: {sorted(record)[:8]})")
        if not isinstance(record[text_key], str):
            raise ValueError(f"{path}:{lineno}: {text_key!r} must be a string, "
                             f"got {type(record[text_key]).__name__}")
        yield Document(path, lineno, record[text_key])


def _tokenizer_info(tok: Tokenizer) -> dict:
    folder = Path(tok.name_or_path)
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return {"name": folder.name, "backend": tok.backend, "vocab_size": tok.vocab_size,
            "sha256": digest.hexdigest()}


class _ShardWriter:
    """Appends documents to shard-NNNNN.bin/.idx in ``folder``, hashing as it goes."""

    def __init__(self, folder: Path, max_shard_tokens: int) -> None:
        self.folder, self.max_shard_tokens = folder, max_shard_tokens
        self.shards: list[dict] = []
        self.content = hashlib.sha256()
        self._file = None
        self._offsets: list[int] = []
        self._hash = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        if self._file is not None and self._offsets[-1] + len(ids) > self.max_shard_tokens:
            self._close()
        if self._file is None:
            name = f"shard-{len(self.shards):05d}"
            self._file = open(self.folder / f"{name}.bin", "wb")
            self._offsets, self._hash = [0], hashlib.sha256()
        data = ids.astype(TOKEN_DTYPE, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.content.update(data)
        self._offsets.append(self._offsets[-1] + len(ids))

    def _close(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        offsets = np.asarray(self._offsets, dtype=OFFSET_DTYPE).tobytes()
        (self.folder / f"{name}.idx").write_bytes(offsets)
        self._hash.update(offsets)
        self.content.update(offsets)
        self.shards.append({"tokens": f"{name}.bin", "offsets": f"{name}.idx",
                            "num_tokens": self._offsets[-1], "num_documents": len(self._offsets) - 1,
                            "sha256": self._hash.hexdigest()})

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder onto ``final``, replacing an older one."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _matches(path: Path, name: str) -> bool:
    return name in (path.name, path.stem, str(path), path.as_posix()) or Path(name).resolve() == path.resolve()


def tokenize_corpus(inputs: Sequence[str | Path], out: str | Path, *, holdout: Sequence[str] = (),
                    tokenizer: Tokenizer | str | Path | None = None,
                    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS, text_key: str = "text",
                    progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Tokenize ``inputs`` into ``out/train`` (and ``out/eval`` for the ``holdout`` files).

    Args:
        inputs: files, directories or glob patterns (see `resolve_inputs`).
        out: output folder, created if missing; ``out/train`` and ``out/eval`` are replaced.
        holdout: files for the eval folder, named by file name, stem or path; each name must
            match an input file.
        tokenizer: a Tokenizer or its folder (default: the bundled MiniCPM4 tokenizer).
        max_shard_tokens: soft cap on tokens per shard (see the module docstring).
        text_key: the JSONL field holding the text.
        progress: called with one line per input file and per finished folder.
    Returns:
        {"train": folder, "eval": folder} (eval only with holdout).
    """
    if type(max_shard_tokens) is not int or max_shard_tokens < 1:
        raise ValueError(f"max_shard_tokens must be a positive int, got {max_shard_tokens!r}")
    files = resolve_inputs(inputs)
    unmatched = [name for name in holdout if not any(_matches(p, name) for p in files)]
    if unmatched:
        raise ValueError(f"--holdout names no input file: {', '.join(unmatched)}")
    split_of = {p: "eval" if any(_matches(p, n) for n in holdout) else "train" for p in files}
    if all(s == "eval" for s in split_of.values()):
        raise ValueError("every input file is held out: the training corpus would be empty")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else \
        Tokenizer.from_pretrained(DEFAULT_TOKENIZER if tokenizer is None else tokenizer)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {tok.name_or_path} has no {BOS_TOKEN} / {EOS_TOKEN} token")
    say = progress or (lambda line: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = sorted(set(split_of.values()), key=("train", "eval").index)
    tmp = {s: out / f".{s}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" for s in splits}
    for folder in tmp.values():
        folder.mkdir()  # unlike mkdtemp, honours the umask
    writers = {s: _ShardWriter(tmp[s], max_shard_tokens) for s in splits}
    stats = {s: {"num_documents": 0, "num_skipped_empty": 0} for s in splits}
    sources: list[dict] = []
    last_said = time.monotonic()
    try:
        for i, path in enumerate(files, start=1):
            split = split_of[path]
            num_docs = num_tokens = 0
            for batch in _batches(iter_documents(path, text_key=text_key), stats[split]):
                for ids in tok.encode_batch([d.text for d in batch], add_special_tokens=False):
                    doc_ids = np.empty(len(ids) + 2, dtype=TOKEN_DTYPE)
                    doc_ids[0], doc_ids[1:-1], doc_ids[-1] = bos, ids, eos
                    writers[split].add(doc_ids)
                    num_docs, num_tokens = num_docs + 1, num_tokens + len(doc_ids)
                if time.monotonic() - last_said > _PROGRESS_SECONDS:  # long files report too
                    say(f"[{i}/{len(files)}] {path}: {num_docs:,} documents, {num_tokens:,} tokens so far")
                    last_said = time.monotonic()
            stats[split]["num_documents"] += num_docs
            sources.append({"path": path.as_posix(), "split": split, "num_documents": num_docs,
                            "num_tokens": num_tokens})
            say(f"[{i}/{len(files)}] {path} -> {split}: {num_docs:,} documents, {num_tokens:,} tokens")
            last_said = time.monotonic()
        indexes = {}
        for split in splits:  # check every folder before any replaces an older one
            shards = writers[split].finish()
            if not shards:
                raise ValueError(f"empty corpus: no non-empty document for the {split} folder")
            indexes[split] = {
                "format": FORMAT, "version": VERSION, "dtype": TOKEN_DTYPE.str,
                "offsets_dtype": OFFSET_DTYPE.str, "bos_id": bos, "eos_id": eos,
                "tokenizer": _tokenizer_info(tok), "max_shard_tokens": max_shard_tokens,
                "num_tokens": sum(s["num_tokens"] for s in shards), **stats[split], "shards": shards,
                "sources": [s for s in sources if s["split"] == split],
                "content_sha256": writers[split].content.hexdigest()}
        result = {}
        for split, index in indexes.items():
            _write_json_atomic(tmp[split] / INDEX_NAME, index)
            _commit(tmp[split], out / split)
            result[split] = out / split
            say(f"{out / split}: {index['num_documents']:,} documents, {index['num_tokens']:,} "
                f"tokens in {len(index['shards'])} shard(s), {index['num_skipped_empty']} empty skipped")
    finally:
        for split in splits:
            writers[split].abort()
            if tmp[split].exists():
                shutil.rmtree(tmp[split])
    if "eval" not in result and (out / "eval" / INDEX_NAME).is_file():
        shutil.rmtree(out / "eval")  # a stale held-out folder from an earlier run would overlap train
        say(f"removed the stale {out / 'eval'} (no --holdout this time)")
    return result


def _batches(docs: Iterator[Document], stats: dict) -> Iterator[list[Document]]:
    """Group non-empty documents for `Tokenizer.encode_batch`; counts the empty ones."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        if not doc.text:
            stats["num_skipped_empty"] += 1
            continue
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def read_index(folder: str | Path) -> dict:
    """Load and check a shard folder's index.json (format, version, shard files and sizes)."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"no {INDEX_NAME} in {folder} (not a tokenized folder, or still being written)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} index")
    if index.get("dtype") != TOKEN_DTYPE.str or not index.get("shards"):
        raise ValueError(f"{path}: expected dtype {TOKEN_DTYPE.str} and at least one shard")
    for shard in index["shards"]:
        for key, dtype, count in (("tokens", TOKEN_DTYPE, shard["num_tokens"]),
                                  ("offsets", OFFSET_DTYPE, shard["num_documents"] + 1)):
            file = folder / shard[key]
            if not file.is_file() or file.stat().st_size != count * dtype.itemsize:
                raise ValueError(f"{file}: missing or not {count} x {dtype.itemsize} bytes as {path} says")
    return index


def iter_shard_documents(folder: str | Path) -> Iterator[np.ndarray]:
    """Each stored document's token ids (BOS ... EOS, a uint32 memmap view), in order."""
    folder = Path(folder)
    for shard in read_index(folder)["shards"]:
        tokens = np.memmap(folder / shard["tokens"], dtype=TOKEN_DTYPE, mode="r")
        offsets = np.fromfile(folder / shard["offsets"], dtype=OFFSET_DTYPE)
        for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            yield tokens[lo:hi]
