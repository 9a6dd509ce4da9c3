"""`data/packing.py`: windows, positions, doc ids, labels and the document mask vs brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpm4.data.packing import (IGNORE_INDEX, collate, document_causal_mask, num_sequences,
                                   pack_documents, pack_window, segments)
from minicpm4.kernels.attention import attention

BOS, EOS = 1, 2


def _docs(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Documents BOS, content ids >= 10, EOS of the given total lengths (>= 2)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(10, 1000, n - 2), [EOS]]) for n in lengths]


def _brute_force(docs: list[np.ndarray], seq_len: int):
    """Per token of the stream: (document index, offset in document); then each window."""
    doc_of, offset_of = [], []
    for d, doc in enumerate(docs):
        doc_of += [d] * len(doc)
        offset_of += list(range(len(doc)))
    stream = np.concatenate(docs)
    for i in range(num_sequences(len(stream), seq_len)):
        lo = i * seq_len
        positions, doc_ids = [], []
        for t in range(seq_len + 1):
            starts_here = t == 0 or offset_of[lo + t] == 0
            positions.append(0 if starts_here else positions[-1] + 1)
            doc_ids.append(0 if t == 0 else doc_ids[-1] + starts_here)
        labels = [stream[lo + t + 1] if doc_of[lo + t + 1] == doc_of[lo + t] else IGNORE_INDEX
                  for t in range(seq_len)]
        yield stream[lo:lo + seq_len + 1], positions, doc_ids, labels


@pytest.mark.parametrize("lengths, seq_len", [
    ([5, 3, 9, 2, 14, 7], 4), ([40], 8), ([2, 2, 2, 2, 2], 3), ([3, 17, 6, 30, 2, 11], 16),
    ([6, 6], 1)])
def test_pack_documents_matches_brute_force(lengths: list[int], seq_len: int) -> None:
    docs = _docs(lengths)
    packed = pack_documents(docs, seq_len)
    expected = list(_brute_force(docs, seq_len))
    assert len(packed) == len(expected) == (sum(lengths) - 1) // seq_len
    for seq, (tokens, positions, doc_ids, labels) in zip(packed, expected):
        assert seq.tokens_L.tolist() == tokens.tolist() and seq.seq_len == seq_len
        assert seq.positions_L.tolist() == positions
        assert seq.doc_ids_L.tolist() == doc_ids
        row = seq.model_inputs()
        assert row["labels"].tolist() == labels
        assert row["input_ids"].tolist() == tokens[:-1].tolist()
        assert row["positions"].tolist() == positions[:-1] and row["doc_ids"].tolist() == doc_ids[:-1]


def test_windows_cover_the_stream_and_only_eos_to_bos_is_ignored() -> None:
    docs = _docs([7, 3, 12, 5, 9, 4], seed=1)
    stream = np.concatenate(docs)
    packed = pack_documents(docs, 6)
    covered = np.concatenate([s.tokens_L[:-1] for s in packed] + [packed[-1].tokens_L[-1:]])
    assert covered.tolist() == stream[:len(covered)].tolist()
    for seq in packed:
        row = seq.model_inputs()
        ignored = row["labels"] == IGNORE_INDEX
        assert (row["input_ids"][ignored] == EOS).all()
        assert (seq.tokens_L[1:][ignored] == BOS).all()
        assert (row["labels"][~ignored] == seq.tokens_L[1:][~ignored]).all()
        # every document start inside the window (a BOS) has position 0
        assert (seq.positions_L[seq.tokens_L == BOS] == 0).all() and seq.positions_L[0] == 0


def test_segments() -> None:
    positions, doc_ids = segments(8, [3, 5, 5, 0, 9, -1])
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert doc_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert positions.dtype == doc_ids.dtype == np.int64
    positions, doc_ids = segments(4, np.array([], dtype=np.int64))
    assert positions.tolist() == [0, 1, 2, 3] and doc_ids.tolist() == [0, 0, 0, 0]


def _brute_force_mask(doc_ids: list[int]) -> torch.Tensor:
    T = len(doc_ids)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            mask[q, k] = k <= q and doc_ids[q] == doc_ids[k]
    return mask


def test_document_causal_mask_matches_brute_force() -> None:
    rows = [seq.model_inputs()["doc_ids"] for seq in pack_documents(_docs([5, 3, 9, 2, 14, 7]), 12)]
    doc_ids_BT = torch.from_numpy(np.stack(rows))
    mask_BTT = document_causal_mask(doc_ids_BT)
    assert mask_BTT.shape == (len(rows), 12, 12) and mask_BTT.dtype == torch.bool
    for b, row in enumerate(rows):
        expected = _brute_force_mask(row.tolist())
        assert torch.equal(mask_BTT[b], expected)
        assert torch.equal(document_causal_mask(doc_ids_BT[b]), expected)
    single = document_causal_mask(torch.zeros(6, dtype=torch.long))
    assert torch.equal(single, torch.ones(6, 6, dtype=torch.bool).tril())


def test_mask_makes_packed_attention_equal_per_document_attention() -> None:
    """Attention over a packed row with the document mask = causal attention per document."""
    doc_ids_T = torch.from_numpy(segments(20, [4, 11, 12])[1])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=gen) for _ in range(3))
    mask_B1TT = document_causal_mask(doc_ids_T).view(1, 1, 20, 20)
    packed = attention(q, k, v, mask_B1TS=mask_B1TT, backend="reference")
    for lo, hi in [(0, 4), (4, 11), (11, 12), (12, 20)]:
        alone = attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=True,
                          backend="reference")
        torch.testing.assert_close(packed[:, :, lo:hi], alone)


def test_collate_shapes_and_dtypes() -> None:
    batch = collate(pack_documents(_docs([9, 9, 9, 9]), 5))
    assert set(batch) == {"input_ids", "labels", "positions", "doc_ids"}
    for tensor in batch.values():
        assert tensor.shape == (7, 5) and tensor.dtype == torch.int64


def test_errors() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(_docs([4]), 0)
    with pytest.raises(ValueError, match="document 1 is empty"):
        pack_documents([[1, 2], []], 4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pack_window([1], [])
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        document_causal_mask(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    assert pack_documents([], 4) == [] and num_sequences(1, 4) == 0 and num_sequences(9, 4) == 2
