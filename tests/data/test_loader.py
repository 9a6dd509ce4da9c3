"""`data/loader.py`: reference equality, determinism, resume exactness, rank sharding, epochs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm4.data.loader import TokenLoader
from minicpm4.data.packing import collate, pack_documents
from minicpm4.data.tokenize import iter_shard_documents, tokenize_corpus
from tests.data import load_tokenizer, random_texts, real_book, write_jsonl

T = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """About 60 documents in several shards, so that windows cross shard boundaries."""
    src = tmp_path_factory.mktemp("src")
    write_jsonl(src / "a.jsonl", random_texts(40, seed=0, max_words=30))
    write_jsonl(src / "b.jsonl", random_texts(20, seed=1, max_words=60))
    out = tokenize_corpus([src], tmp_path_factory.mktemp("out"), tokenizer=load_tokenizer(),
                          max_shard_tokens=300)
    return out["train"]


def _take(loader: TokenLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(loader, n))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_unshuffled_stream_equals_reference_packing(shards: Path) -> None:
    loader = TokenLoader(shards, T, 3, shuffle=False)
    assert len(loader.index["shards"]) > 3 and isinstance(loader._tokens[0], np.memmap)
    docs = [d.astype(np.int64) for d in iter_shard_documents(shards)]
    packed = pack_documents(docs, T)
    assert loader.num_sequences == len(packed) == (sum(map(len, docs)) - 1) // T
    batches = _take(loader, loader.steps_per_epoch)
    expected = [collate(packed[i:i + 3]) for i in range(0, 3 * loader.steps_per_epoch, 3)]
    _assert_same(batches, expected)
    for batch in batches:
        assert batch["input_ids"].shape == (3, T) and batch["labels"].dtype == torch.int64


def test_shuffle_is_deterministic_and_seeded(shards: Path) -> None:
    a, b = TokenLoader(shards, T, 4, seed=7), TokenLoader(shards, T, 4, seed=7)
    _assert_same(_take(a, 5), _take(b, 5))
    c = TokenLoader(shards, T, 4, seed=8)
    assert not np.array_equal(c.order(0), a.order(0))
    assert sorted(a.order(0).tolist()) == list(range(a.num_sequences))
    assert torch.equal(TokenLoader(shards, T, 4, seed=7).get_batch(0, 2)["input_ids"],
                       TokenLoader(shards, T, 4, seed=7).get_batch(0, 2)["input_ids"])


@pytest.mark.parametrize("consumed", [0, 1, 5, "epoch-1", "epoch", "epoch+3"])
def test_resume_yields_exactly_the_uninterrupted_batches(shards: Path, consumed) -> None:
    steps = TokenLoader(shards, T, 4, seed=3).steps_per_epoch
    k = consumed if isinstance(consumed, int) else steps + int(consumed[5:] or 0)
    uninterrupted = TokenLoader(shards, T, 4, seed=3)
    _take(uninterrupted, k)
    interrupted = TokenLoader(shards, T, 4, seed=3)
    _take(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint file
    resumed = TokenLoader(shards, T, 4, seed=3)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (k // steps, k % steps)
    _assert_same(_take(resumed, steps + 2), _take(uninterrupted, steps + 2))


def test_ranks_are_disjoint_slices_of_the_global_batch(shards: Path) -> None:
    single = TokenLoader(shards, T, 6, seed=5)
    ranks = [TokenLoader(shards, T, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    assert ranks[0].steps_per_epoch == single.steps_per_epoch
    seen: list[set[int]] = [set(), set()]
    for step in range(single.steps_per_epoch):
        want = next(single)
        got = [next(r) for r in ranks]
        for key in want:
            assert torch.equal(torch.cat([got[0][key], got[1][key]]), want[key])
        for r, loader in enumerate(ranks):
            seen[r].update(loader.sequence_ids(0, step).tolist())
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(single.order(0)[:single.steps_per_epoch * 6].tolist())


def test_resume_with_another_world_size_and_the_same_global_batch(shards: Path) -> None:
    two = [TokenLoader(shards, T, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for loader in two:
        _take(loader, 3)
    four = [TokenLoader(shards, T, 1, rank=r, world_size=4, seed=1) for r in range(4)]
    for loader in four:
        loader.load_state_dict(two[0].state_dict())
    halves = [torch.cat([next(four[2 * r])["input_ids"], next(four[2 * r + 1])["input_ids"]])
              for r in range(2)]
    for half, loader in zip(halves, two):
        assert torch.equal(half, next(loader)["input_ids"])


def test_epoch_rollover(shards: Path) -> None:
    loader = TokenLoader(shards, T, 4, seed=2)
    steps = loader.steps_per_epoch
    ids = []
    for _ in range(steps):
        ids.append(loader.sequence_ids(loader.epoch, loader.step).tolist())
        next(loader)
    assert (loader.epoch, loader.step) == (1, 0) and loader.state_dict()["epoch"] == 1
    flat = sum(ids, [])
    assert len(flat) == len(set(flat)) == steps * 4  # each window at most once per epoch
    assert loader.order(1).tolist() != loader.order(0).tolist()
    next(loader)
    assert (loader.epoch, loader.step) == (1, 1)
    plain = TokenLoader(shards, T, 4, shuffle=False)
    _assert_same(_take(plain, steps)[:2], _take(plain, 2))  # unshuffled epochs repeat


def test_batches_are_consistent(shards: Path) -> None:
    batch = next(TokenLoader(shards, T, 8, seed=0))
    starts = batch["positions"] == 0
    assert torch.equal(batch["doc_ids"][:, 1:] - batch["doc_ids"][:, :-1], starts[:, 1:].long())
    shifted = batch["labels"][:, :-1]
    kept = shifted != -100
    assert torch.equal(shifted[kept], batch["input_ids"][:, 1:][kept])
    assert (batch["input_ids"][:, 1:][~kept] == 1).all()  # only predicting a BOS is ignored


def test_state_and_argument_errors(shards: Path, tmp_path: Path) -> None:
    loader = TokenLoader(shards, T, 4, seed=0)
    state = loader.state_dict()
    for key, value in [("seed", 1), ("seq_len", 32), ("global_batch_size", 8),
                       ("shuffle", False), ("content_sha256", "0" * 64)]:
        with pytest.raises(ValueError, match=f"another stream: {key}"):
            loader.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({**state, "step": loader.steps_per_epoch})
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="rank 2 must be < world_size 2"):
        TokenLoader(shards, T, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(shards, T, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenLoader(shards, 4096, 4)
    with pytest.raises(ValueError, match="no index.json"):
        TokenLoader(tmp_path, T, 1)


def test_real_book(tmp_path: Path) -> None:
    out = tokenize_corpus([real_book()], tmp_path, tokenizer=load_tokenizer())
    loader = TokenLoader(out["train"], 256, 4, seed=0)
    batch = next(loader)
    assert loader.num_sequences == (loader.num_tokens - 1) // 256
    assert torch.equal(batch["positions"], torch.arange(256).expand(4, 256))  # one document
    assert (batch["doc_ids"] == 0).all() and (batch["labels"] != -100).all()
