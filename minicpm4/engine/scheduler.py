"""Continuous batching with chunked prefill, prefix reuse and preemption (issue 5; spec §4.1).

A step is a list of (sequence, number of tokens to compute). Running sequences come first,
in admission order: each gets its remaining tokens (one for a decode, a prefill chunk of at
most `max_prefill_chunk` otherwise) within the step's token budget. When the pool has no page
for a running sequence, the most recently admitted running sequence is preempted: its pages
are freed and it goes back to the front of the queue, to be recomputed (prompt + the tokens it
already generated) when memory allows; its output stream simply continues. Waiting sequences
are admitted, oldest first, while the budget, `max_num_seqs` and the pool allow; a new one
first takes the longest cached prefix of its tokens from the pool (its compute starts after
it).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.kv_cache import BlockPool, hash_block
from minicpm4.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, config: EngineConfig, *, whole_prefill: bool = False
                 ) -> None:
        """`whole_prefill`: a prompt is computed in one piece and never from cached pages
        (InfLLM v2 with use_nope selects with pre-RoPE keys, which the pages do not keep)."""
        self.pool = pool
        self.config = config
        self.whole_prefill = whole_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0

    # ---------------------------------------------------------------- queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget, first=not out.scheduled)
            if n == 0:
                i += 1
                continue
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self._take_prefix(seq)
            n = self._chunk(seq, budget, first=not out.scheduled)
            if n == 0 or not self._reserve(seq, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.metrics.num_cached_prompt_tokens += cached
            self.prefix_hit_tokens += cached
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """After the forward: `num_tokens` more tokens of `seq` are stored; full blocks become
        findable in the prefix cache."""
        seq.num_computed += num_tokens
        bs = self.pool.block_size
        ids = None
        while len(seq.block_hashes) < seq.num_computed // bs:
            ids = seq.all_ids if ids is None else ids
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = hash_block(parent, ids[i * bs:(i + 1) * bs])
            self.pool.register(seq.block_table[i], h)
            seq.block_hashes.append(h)

    # ---------------------------------------------------------------- helpers
    def _chunk(self, seq: Sequence, budget: int, *, first: bool) -> int:
        left = seq.num_uncomputed
        if self.whole_prefill and seq.num_computed == 0:
            return left if (left <= budget or first) else 0
        return min(left, self.config.max_prefill_chunk, budget)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.pool.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _take_prefix(self, seq: Sequence) -> int:
        """Start a sequence that holds no pages from the cached pages of its prefix (the last
        token is always computed: its logits are needed). Returns the tokens reused."""
        if seq.block_table or self.whole_prefill:
            return 0
        blocks, hashes = self.pool.match_prefix(seq.all_ids[:seq.num_tokens - 1])
        seq.block_table = blocks
        seq.block_hashes = hashes
        seq.num_computed = len(blocks) * self.pool.block_size
        return seq.num_computed

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        self.pool.drop_sparse(seq.request_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
