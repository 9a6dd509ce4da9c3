"""Deterministic, resumable, data-parallel batches over token shards (architecture §3 `data/loader.py`).

The shards of a folder written by `data.tokenize` form one token stream (shard order); it is cut
into `packing.num_sequences` windows of seq_len + 1 tokens (see `data/packing.py` for the window
layout, positions, doc ids and labels). Shards are memory-mapped: a batch reads only its own
windows and a binary search over the document offsets, never the whole corpus.

Order. Epoch e visits the windows in ``rng([seed, e]).permutation(num_sequences)`` (identity
with ``shuffle=False``), cut into global batches of G = world_size x batch_size; the last
``num_sequences % G`` windows of the epoch's order are dropped so every rank takes the same
number of steps. Rank r takes rows ``[r*B, (r+1)*B)`` of each global batch, so ranks see
disjoint windows and stacking the ranks' batches in rank order gives the batch of one process
with batch_size G. The order is held in memory, 8 bytes per window (0.5 GB for 2^36 tokens at
T = 1024); a hashed bijection can replace it if corpora outgrow that.

Resumption. The position is (epoch, step), the next global batch; `state_dict` also records
what defines the stream (seq_len, G, seed, shuffle, the corpus content hash) and
`load_state_dict` refuses another stream. Rank and world size may change as long as G does not.

Shape legend: B batch_size (per rank), T seq_len, L = T + 1, G = world_size x B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicpm4.data.packing import PackedSequence, collate, num_sequences, pack_window
from minicpm4.data.tokenize import OFFSET_DTYPE, TOKEN_DTYPE, read_index

__all__ = ["TokenLoader"]

_STREAM_KEYS = ("seq_len", "global_batch_size", "seed", "shuffle", "content_sha256")


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class TokenLoader:
    """Infinite iterator of batches ``{"input_ids", "labels", "positions", "doc_ids"}``, int64 [B, T].

    Args:
        folder: a shard folder (``out/train`` or ``out/eval`` of `data.tokenize`).
        seq_len: T, tokens per input row.
        batch_size: B, rows per batch on this rank.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: shuffling seed (epoch e uses ``[seed, e]``).
        shuffle: permute the windows each epoch; False keeps stream order (evaluation).
    """

    def __init__(self, folder: str | Path, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.world_size = _positive_int("world_size", world_size)
        self.rank = _positive_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} must be < world_size {world_size}")
        self.seed = _positive_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self._tokens = [np.memmap(self.folder / s["tokens"], dtype=TOKEN_DTYPE, mode="r")
                        for s in self.index["shards"]]
        # document start offsets per shard (the idx files minus their final end offset)
        self._starts = [np.memmap(self.folder / s["offsets"], dtype=OFFSET_DTYPE, mode="r")[:-1]
                        for s in self.index["shards"]]
        self._bases = np.cumsum([0] + [s["num_tokens"] for s in self.index["shards"]])
        self.num_tokens = int(self._bases[-1])
        self.num_sequences = num_sequences(self.num_tokens, self.seq_len)
        self.global_batch_size = self.world_size * self.batch_size
        if self.num_sequences < self.global_batch_size:
            raise ValueError(f"{self.folder}: {self.num_tokens:,} tokens make {self.num_sequences} "
                             f"sequences of {seq_len} + 1 tokens, fewer than one global batch "
                             f"({world_size} x {batch_size})")
        self.steps_per_epoch = self.num_sequences // self.global_batch_size
        self.epoch = 0
        self.step = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def content_sha256(self) -> str:
        return self.index["content_sha256"]

    def sequence(self, i: int) -> PackedSequence:
        """Window i of the stream: tokens [i*T, i*T + T + 1), read from the memmaps."""
        if not 0 <= i < self.num_sequences:
            raise ValueError(f"sequence {i} out of range [0, {self.num_sequences})")
        lo, hi = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        pieces, starts = [], []
        shard = int(np.searchsorted(self._bases, lo, side="right")) - 1
        while shard < len(self._tokens) and self._bases[shard] < hi:
            base = int(self._bases[shard])
            a, b = max(lo - base, 0), min(hi - base, len(self._tokens[shard]))
            pieces.append(self._tokens[shard][a:b])
            doc_starts = self._starts[shard]
            first, last = np.searchsorted(doc_starts, [a, b], side="left")
            starts.append(doc_starts[first:last].astype(np.int64) + (base - lo))
            shard += 1
        return pack_window(np.concatenate(pieces), np.concatenate(starts))

    def order(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (all num_sequences indices; cached for one epoch)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return self._order

    def sequence_ids(self, epoch: int, step: int) -> np.ndarray:
        """Window indices [B] of this rank's rows in global batch ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"(epoch {epoch}, step {step}) out of range: "
                             f"{self.steps_per_epoch} steps per epoch")
        first = step * self.global_batch_size + self.rank * self.batch_size
        return self.order(epoch)[first:first + self.batch_size]

    def get_batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch at (epoch, step), without moving the iterator."""
        return collate([self.sequence(int(i)) for i in self.sequence_ids(epoch, step)])

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.get_batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The next (epoch, step) plus the settings that define the stream (JSON-serialisable)."""
        return {"epoch": self.epoch, "step": self.step, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "content_sha256": self.content_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it belongs to another stream or is malformed."""
        missing = [k for k in ("epoch", "step", *_STREAM_KEYS) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        mine = self.state_dict()
        for key in _STREAM_KEYS:
            if state[key] != mine[key]:
                raise ValueError(f"loader state is for another stream: {key} {state[key]!r} != {mine[key]!r}")
        epoch, step = state["epoch"], state["step"]
        if type(epoch) is not int or type(step) is not int or epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"loader state position (epoch {epoch!r}, step {step!r}) out of range")
        self.epoch, self.step = epoch, step
