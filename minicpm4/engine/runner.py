"""Scheduled tokens -> model forwards -> last-position logits (issue 5).

A step's work is split into forwards the model's cache protocol can express (`PagedBatch`:
rows that already hold tokens receive the same number of new tokens; only rows starting from
nothing may be left-padded):
- decode rows (one new token after stored ones) in one batched forward;
- first chunks of new sequences in one left-padded forward;
- continuing prefill chunks, one forward per chunk length (equal lengths share a forward).
The logits of all forwards come back as one `[R, V]` tensor with a row per finished sequence.
Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from minicpm4.engine.kv_cache import BlockPool, PagedBatch
from minicpm4.engine.sequence import Sequence
from minicpm4.model.transformer import MiniCPM4ForCausalLM


class ModelRunner:
    def __init__(self, model: MiniCPM4ForCausalLM, pool: BlockPool, *, pad_id: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.pad_id = pad_id
        self.device = model.device
        self.sparse = model.config.sparse_config is not None
        self.num_forwards = 0

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]
            ) -> tuple[torch.Tensor, dict[str, int]]:
        """Compute the scheduled tokens (writing their K/V into the pages). Returns fp32
        last-position logits `[R, V]` and, for every sequence whose tokens are now all
        computed, its row there. With one forward (the usual decode step) the tensor is that
        forward's logits as they are, rows of unfinished prefill chunks included: no copy."""
        fresh: list[tuple[Sequence, int]] = []
        by_len: dict[int, list[tuple[Sequence, int]]] = {}  # n == 1: the decode rows
        for seq, n in scheduled:
            if seq.num_computed == 0:
                fresh.append((seq, n))
            else:
                by_len.setdefault(n, []).append((seq, n))
        groups = list(by_len.values()) + ([fresh] if fresh else [])
        parts, rows, offset = [], {}, 0
        for group in groups:
            logits_BV = self._forward(group)
            for b, (seq, n) in enumerate(group):
                if seq.num_computed + n == seq.num_tokens:
                    rows[seq.request_id] = offset + b
            parts.append(logits_BV)
            offset += logits_BV.shape[0]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), rows

    def _forward(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        T = max(n for _, n in group)
        B = len(group)
        ids_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
        padded = any(n != T for _, n in group)
        mask_BT = torch.zeros(B, T, dtype=torch.bool) if padded else None
        for b, (seq, n) in enumerate(group):
            start = seq.num_computed
            ids_BT[b, T - n:] = torch.tensor(seq.tokens(start, start + n), dtype=torch.long)
            if mask_BT is not None:
                mask_BT[b, T - n:] = True
        cache = PagedBatch(self.pool, [s.block_table for s, _ in group],
                           [s.num_computed for s, _ in group], [n for _, n in group],
                           seq_ids=[s.request_id for s, _ in group] if self.sparse else None)
        logits_BV = self.model(ids_BT.to(self.device), cache=cache, logits_to_keep=1,
                               attention_mask_BT=None if mask_BT is None
                               else mask_BT.to(self.device))[:, -1]
        self.num_forwards += 1
        return logits_BV
