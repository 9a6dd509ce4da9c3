"""Sequence packing with document-aware positions, ids, labels and masks (architecture §3, spec §5).

The corpus is one stream: its documents (each ``BOS ... EOS``) concatenated in shard order.
Sequence i is the window ``stream[i*T : i*T + T + 1]`` (T = seq_len): its first T tokens are
the inputs, its last T the targets, so consecutive windows share one token and every token but
the first is a target exactly once (the Megatron / nanoGPT layout, no padding). A document is
cut where a window ends and its remainder opens the next window. Within a window:

- **positions** restart at 0 at each document start *and* at the window start: a fragment that
  continues a document is, for the model, a document of its own (attention cannot see the part
  in the previous window), and positions never exceed seq_len, the trained RoPE range;
- **doc_ids** number the window's segments 0, 1, 2, ... (local to the window); attention is
  restricted within a document by `document_causal_mask` (True = may attend, the convention of
  `kernels.attention`);
- **labels** are the shifted tokens, with ``IGNORE_INDEX`` (-100, `F.cross_entropy`'s default)
  for the one cross-document prediction per boundary, "EOS of document A -> BOS of document B".
  Under a document mask the EOS cannot see B, and BOS is always given, never generated, so that
  target only teaches the separator layout. Predicting A's EOS from A is kept: it is how the
  model learns to end a document.

Shape legend: B batch, T seq_len (model inputs), L = T + 1 (a packed window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from minicpm4.utils.masks import document_causal_mask

__all__ = ["IGNORE_INDEX", "PackedSequence", "num_sequences", "segments", "shift_labels",
           "pack_window", "pack_documents", "collate", "document_causal_mask"]

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "positions", "doc_ids")


def _check_seq_len(seq_len: int) -> int:
    if type(seq_len) is not int or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return seq_len


def num_sequences(num_tokens: int, seq_len: int) -> int:
    """How many full windows of seq_len + 1 tokens (stride seq_len) a stream of num_tokens holds;
    the tail that does not fill a window is dropped."""
    return max(num_tokens - 1, 0) // _check_seq_len(seq_len)


def segments(length: int, starts: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RoPE positions and window-local document ids of a window.

    Args:
        length: tokens in the window (L).
        starts: offsets within the window where a document starts (any order; 0, duplicates and
            offsets outside [0, length) are ignored: the window start always opens a segment).
    Returns:
        (positions_L, doc_ids_L), int64: positions count from 0 in each segment, doc ids are
        0 for the segment at the window start and +1 at each start.
    """
    starts_S = np.asarray(starts, dtype=np.int64).reshape(-1)
    starts_S = np.unique(starts_S[(starts_S > 0) & (starts_S < length)])
    is_start_L = np.zeros(length, dtype=np.int64)
    is_start_L[starts_S] = 1
    doc_ids_L = np.cumsum(is_start_L)
    first_S = np.concatenate([np.zeros(1, dtype=np.int64), starts_S])  # start of segment k
    positions_L = np.arange(length, dtype=np.int64) - first_S[doc_ids_L]
    return positions_L, doc_ids_L


def shift_labels(tokens_L: np.ndarray, doc_ids_L: np.ndarray) -> np.ndarray:
    """Targets [T] of a window: tokens_L[1:], IGNORE_INDEX where the target lies in another
    document than the input token (the EOS -> next BOS step)."""
    labels_T = np.asarray(tokens_L[1:], dtype=np.int64).copy()
    labels_T[doc_ids_L[1:] != doc_ids_L[:-1]] = IGNORE_INDEX
    return labels_T


@dataclass(frozen=True)
class PackedSequence:
    """One packed window of L = seq_len + 1 tokens (int64 numpy arrays)."""

    tokens_L: np.ndarray
    """Token ids of the window (inputs are [:-1], targets [1:])."""
    positions_L: np.ndarray
    """RoPE positions, restarting at 0 at each document start and at the window start."""
    doc_ids_L: np.ndarray
    """Window-local document ids 0, 1, 2, ..."""

    @property
    def seq_len(self) -> int:
        return len(self.tokens_L) - 1

    def model_inputs(self) -> dict[str, np.ndarray]:
        """``input_ids``, ``labels``, ``positions``, ``doc_ids``: int64 arrays of shape [T]."""
        return {"input_ids": self.tokens_L[:-1], "labels": shift_labels(self.tokens_L, self.doc_ids_L),
                "positions": self.positions_L[:-1], "doc_ids": self.doc_ids_L[:-1]}


def pack_window(tokens_L: np.ndarray | Sequence[int], starts: Sequence[int] | np.ndarray) -> PackedSequence:
    """Pack one window of tokens whose documents start at ``starts`` (offsets in the window)."""
    tokens_L = np.asarray(tokens_L, dtype=np.int64).reshape(-1)
    if len(tokens_L) < 2:
        raise ValueError(f"a window needs at least 2 tokens (seq_len >= 1), got {len(tokens_L)}")
    positions_L, doc_ids_L = segments(len(tokens_L), starts)
    return PackedSequence(tokens_L=tokens_L, positions_L=positions_L, doc_ids_L=doc_ids_L)


def pack_documents(docs: Iterable[Sequence[int] | np.ndarray], seq_len: int) -> list[PackedSequence]:
    """Reference packer: concatenate ``docs`` and cut the windows of `num_sequences`.

    In memory; the loader computes the same windows lazily from memory-mapped shards.
    Raises ValueError for an empty document (it would have no start token).
    """
    _check_seq_len(seq_len)
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    for i, doc in enumerate(arrays):
        if len(doc) == 0:
            raise ValueError(f"document {i} is empty")
    if not arrays:
        return []
    stream = np.concatenate(arrays)
    starts = np.cumsum([0] + [len(d) for d in arrays[:-1]])
    packed = []
    for i in range(num_sequences(len(stream), seq_len)):
        lo, hi = i * seq_len, i * seq_len + seq_len + 1
        inside = starts[(starts > lo) & (starts < hi)] - lo
        packed.append(pack_window(stream[lo:hi], inside))
    return packed


def collate(seqs: Sequence[PackedSequence]) -> dict[str, torch.Tensor]:
    """Stack packed windows into the batch dict: int64 tensors ``input_ids``, ``labels``,
    ``positions``, ``doc_ids``, each [B, T]."""
    if not seqs:
        raise ValueError("cannot collate an empty list of sequences")
    rows = [s.model_inputs() for s in seqs]
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}

