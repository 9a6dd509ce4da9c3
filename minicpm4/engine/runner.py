"""Scheduled tokens -> model forwards -> last-position logits (issue 5).

A step's work is split into batches the model's cache protocol can express (`PagedBatch`:
rows that already hold tokens receive the same number of new tokens; only rows starting from
nothing may be left-padded):
- decode rows (one new token after stored ones), batched;
- first chunks of new sequences, left-padded to a common length;
- continuing prefill chunks, a batch per chunk length.
These batches run as one forward (`model/grouped.py`: the token-wise parts, and so the reading
of every weight, once for all of them and only for real tokens; attention per batch), as does
a lone padded batch (its padding left out of the GEMMs) and, where the lean layers apply, any
lone batch of prompt chunks (which spares the module path's per-op dispatch). On bf16 CPU a
step with prompt chunks runs as rows of one token each (`fast_decode.token_logits`) where
that applies, and a step of decode rows alone takes the lean decode forward
(`model/fast_decode.py`, bit-identical). The logits come back as one `[R, V]` tensor with a
row per finished sequence.
Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from minicpm4.engine.kv_cache import BlockPool, PagedBatch, token_layout
from minicpm4.engine.sequence import Sequence
from minicpm4.kernels import cpu_ext
from minicpm4.model import fast_decode
from minicpm4.model.grouped import Batch, grouped_logits
from minicpm4.model.transformer import MiniCPM4ForCausalLM


class ModelRunner:
    def __init__(self, model: MiniCPM4ForCausalLM, pool: BlockPool, *, pad_id: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.pad_id = pad_id
        self.device = model.device
        self.sparse = model.config.sparse_config is not None
        self.num_forwards = 0
        if self.device.type == "cpu" and model.dtype == torch.bfloat16 and cpu_ext.enabled():
            cpu_ext.preload()  # builds happen now, not inside the first request
        self.fast_decode = fast_decode.supports(model)
        """Whether decode steps may take the lean forward (`model/fast_decode.py`)."""
        self._packed = fast_decode.pack_layers(model) if self.fast_decode else None
        """The C++ layer loop's per-layer arguments (`fast_decode.pack_layers`), or None."""

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]
            ) -> tuple[torch.Tensor, dict[str, int]]:
        """Compute the scheduled tokens (writing their K/V into the pages). Returns the
        last-position logits `[R, V]` (in the model's dtype) and, for every sequence whose
        tokens are now all computed, its row there. The rows of unfinished prefill chunks are
        included: the tensor is the forward's logits as they are, no copy."""
        self.num_forwards += 1
        computed, new = [s.num_computed for s, _ in scheduled], [n for _, n in scheduled]
        if self.fast_decode and any(n > 1 or c == 0 for c, n in zip(computed, new)) \
                and fast_decode.token_applies(self._packed, computed, new):
            return self._token_step(scheduled, computed, new)
        fresh: list[tuple[Sequence, int]] = []
        by_len: dict[int, list[tuple[Sequence, int]]] = {}  # n == 1: the decode rows
        for seq, n in scheduled:
            if seq.num_computed == 0:
                fresh.append((seq, n))
            else:
                by_len.setdefault(n, []).append((seq, n))
        groups = list(by_len.values()) + ([fresh] if fresh else [])
        rows, offset = {}, 0
        for group in groups:
            for b, (seq, n) in enumerate(group):
                if seq.num_computed + n == seq.num_tokens:
                    rows[seq.request_id] = offset + b
            offset += len(group)
        batches = [self._batch(group) for group in groups]
        lean = self.fast_decode and fast_decode.grouped_applies(self.model)
        if len(batches) == 1 and batches[0].mask_BT is None:
            b = batches[0]
            if self.fast_decode and fast_decode.applies(self.model, b.ids_BT, b.cache):
                return fast_decode.decode_logits(self.model, b.ids_BT, b.cache,
                                                 self._packed), rows
            if not lean:
                h_BTD = self.model.model(b.ids_BT, cache=b.cache)
                return self.model.compute_logits(h_BTD[:, -1], keep_dtype=True), rows
        # the weights are read once for all batches, for no padding token, and on the lean
        # path, the layers without per-op dispatch (also for a lone batch of prompt chunks)
        return grouped_logits(self.model, batches, keep_dtype=True, lean=lean), rows

    def _token_step(self, scheduled: list[tuple[Sequence, int]], computed: list[int],
                    new: list[int]) -> tuple[torch.Tensor, dict[str, int]]:
        """The step as rows of one token each (`fast_decode.token_logits`): logits row i for
        scheduled sequence i (computed[i] tokens stored, new[i] to compute)."""
        ids, row_last, last = [], [], []
        for (seq, _), c, n in zip(scheduled, computed, new):
            ids += seq.tokens(c, c + n)
            row_last += [c + n - 1] * n
            last.append(len(ids) - 1)
        positions_N, slots_N, table_NW, lens_N = token_layout(
            self.pool, [s.block_table for s, _ in scheduled], computed, new)
        layout = (self.pool.k, self.pool.v, slots_N, table_NW, lens_N)
        logits_RV = fast_decode.token_logits(
            self.model, torch.tensor(ids, dtype=torch.long, device=self.device), positions_N,
            torch.tensor(row_last, dtype=torch.long, device=self.device), layout,
            torch.tensor(last, dtype=torch.long, device=self.device), self._packed)
        rows = {seq.request_id: i
                for i, ((seq, _), c, n) in enumerate(zip(scheduled, computed, new))
                if c + n == seq.num_tokens}
        return logits_RV, rows

    def _batch(self, group: list[tuple[Sequence, int]]) -> Batch:
        T = max(n for _, n in group)
        B = len(group)
        padded = any(n != T for _, n in group)
        mask_BT = torch.zeros(B, T, dtype=torch.bool) if padded else None
        if not padded:  # one tensor for all rows (a decode step's per-row cost)
            ids_BT = torch.tensor([seq.tokens(seq.num_computed, seq.num_computed + n)
                                   for seq, n in group], dtype=torch.long)
        else:
            ids_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
            for b, (seq, n) in enumerate(group):
                start = seq.num_computed
                ids_BT[b, T - n:] = torch.tensor(seq.tokens(start, start + n), dtype=torch.long)
                mask_BT[b, T - n:] = True
        cache = PagedBatch(self.pool, [s.block_table for s, _ in group],
                           [s.num_computed for s, _ in group], [n for _, n in group],
                           seq_ids=[s.request_id for s, _ in group] if self.sparse else None)
        return Batch(ids_BT.to(self.device), None if mask_BT is None
                     else mask_BT.to(self.device), cache)
