"""The engine's paged KV cache (issue 5; docs/architecture.md "Model <-> cache").

`BlockPool` owns per-layer K/V pages `[num_blocks, block_size, K, H]` (block 0 is a scratch
page that padding reads from and writes to), reference counts, the free queue (least recently
freed first) and the prefix cache: a full block is registered under a hash chained over all
tokens up to its end, so a later request with the same prefix shares the page. A freed page
stays findable until it is handed out again. It also holds InfLLM v2's decode state per
sequence (`sparse_states`): the compressed keys (Kc1 every 16 tokens, Kc2 every 64) that
decode-time selection reads; their bytes are part of the per-block budget (`block_bytes`).

`PagedBatch` is the per-forward view the model sees (the `KVCache` protocol of
`model/cache.py`): rows are sequences, each with its block table and its number of computed
tokens. `update` writes this forward's keys into the rows' pages and returns the stored keys
gathered into a left-padded `[B, K, S_past + T, H]` tensor (padding = block 0). For a decode
batch, `write` + `decode_pages` let bf16 CPU attention read the pages in place instead
(`kernels/paged_attention.py`); `token_layout` describes a step's every new token as a row
of its own for the token-level step (`model/fast_decode.token_logits`). Shape legend: B rows,
T new tokens, S positions, K kv heads, H head dim, L layers, W block-table width, N tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from minicpm4.kernels.infllm_v2.api import SparseLayerState
from minicpm4.kernels.infllm_v2.decode_selection import CompressedKeyBuffer
from minicpm4.model.config import ModelConfig
from minicpm4.utils import hugepages


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs over all layers: K and V, plus InfLLM v2's compressed keys
    (block_size / kernel_stride Kc1 and block_size / coarse_stride Kc2 keys) when sparse."""
    per_token = cfg.num_key_value_heads * cfg.head_dim_ * torch.finfo(dtype).bits // 8
    total = 2 * per_token * block_size
    if cfg.sparse_config is not None:
        sp = cfg.sparse_config
        total += per_token * -(-block_size // sp.kernel_stride)
        total += per_token * -(-block_size // sp.coarse_stride)
    return total * cfg.num_hidden_layers


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained hash of a full block: depends on every token from position 0 to its end."""
    data = np.asarray(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class BlockPool:
    """Fixed pool of KV pages with reference counts and a prefix cache."""

    def __init__(self, cfg: ModelConfig, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the block pool needs at least 2 blocks (block 0 is reserved)")
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim_)

        def pages() -> torch.Tensor:  # on the CPU in huge pages, as the weights (LLM)
            if torch.device(device).type == "cpu":
                return hugepages.zeros(shape, dtype)
            return torch.zeros(shape, dtype=dtype, device=device)
        self.k = [pages() for _ in range(cfg.num_hidden_layers)]
        self.v = [pages() for _ in range(cfg.num_hidden_layers)]
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._hash_of: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}
        self.sparse_states: dict[str, list[SparseLayerState]] = {}

    # ---------------------------------------------------------------- accounting
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"block pool exhausted: {n} blocks wanted, {self.num_free} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of.pop(block, None)
            if old is not None and self._cached.get(old) == block:
                del self._cached[old]
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; the tail is queued first so that it is evicted
        before the shared prefix."""
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self._ref[block] == 0:
                self._free[block] = None

    # ---------------------------------------------------------------- prefix cache
    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Cached full blocks covering the longest prefix of `tokens`, referenced for the
        caller, and their chain hashes."""
        blocks: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent = b""
        bs = self.block_size
        for i in range(len(tokens) // bs):
            parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
            block = self._cached.get(parent)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def register(self, block: int, block_hash: bytes) -> None:
        """Make a just-filled block findable by later requests with the same prefix."""
        if self.enable_prefix_caching and block_hash not in self._cached:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash

    # ---------------------------------------------------------------- sparse state
    def sparse_layers(self, seq_id: str) -> list[SparseLayerState]:
        """InfLLM v2 decode state of a sequence, one per layer (created empty; the first
        forward feeds it every stored key of the row, so a prefix-cache hit or a recompute
        rebuilds it)."""
        states = self.sparse_states.get(seq_id)
        if states is None:
            params = self.cfg.sparse_config
            states = [SparseLayerState([CompressedKeyBuffer(params)])
                      for _ in range(self.cfg.num_hidden_layers)]
            self.sparse_states[seq_id] = states
        return states

    def drop_sparse(self, seq_id: str) -> None:
        self.sparse_states.pop(seq_id, None)


class PagedBatch:
    """`KVCache` over paged sequences for one forward: rows with `num_computed[b]` stored
    tokens each receive the same number T of new tokens (left padding, if any, only for rows
    with nothing stored)."""

    def __init__(self, pool: BlockPool, block_tables: Sequence[Sequence[int]],
                 num_computed: Sequence[int], num_new: Sequence[int],
                 seq_ids: Sequence[str] | None = None) -> None:
        T = max(num_new)
        self._dev = pool.k[0].device
        bs = pool.block_size
        self.pool = pool
        self._seq_ids = seq_ids
        self._S = max(num_computed)
        self._T = T
        if any(n != T and c > 0 for n, c in zip(num_new, num_computed)):
            raise ValueError("rows with stored tokens must all receive the same number of new "
                             "tokens (padding may only precede a row's first token)")
        width = max(1, max(len(t) for t in block_tables))
        table_BW = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables],
                                dtype=torch.long)
        self._table_cpu_BW = table_BW
        self._past = list(num_computed)
        self._num_new = list(num_new)
        self._num_valid_B = torch.tensor(self._past, dtype=torch.long).to(self._dev)
        # a decode batch (one new token after stored ones in every row) can be attended to
        # in the pages themselves (`decode_pages`); its new slots are plain arithmetic
        self._decode = T == 1 and all(c > 0 for c in num_computed)
        if self._decode:
            self._table_BW = table_BW.to(self._dev)
            self._lens_B = self._num_valid_B + 1
            if any(c // bs >= len(table) for table, c in zip(block_tables, num_computed)):
                raise ValueError("a block table has no page for the decode token")
            slots = [table[c // bs] * bs + c % bs for table, c in zip(block_tables, num_computed)]
            self._new_slots_BT = torch.tensor(slots, dtype=torch.long).view(-1, 1)
        else:
            self._new_slots_BT = self._slots_of_new_tokens()
        self._new_slots = self._new_slots_BT.view(-1).to(self._dev)
        # past keys (their slots and validity) only for the gathered path: built on first use
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None

    def _slots_of_new_tokens(self) -> torch.Tensor:
        """[B, T] on the CPU: row b's real new tokens are the last num_new[b] of T; padding ->
        slot 0."""
        T = self._T
        past_B = torch.tensor(self._past, dtype=torch.long)
        new_B = torch.tensor(self._num_new, dtype=torch.long)
        new_tok_BT = past_B.view(-1, 1) + torch.arange(T).view(1, -1) - (T - new_B).view(-1, 1)
        new_tok_BT = torch.where(torch.arange(T).view(1, -1) >= (T - new_B).view(-1, 1),
                                 new_tok_BT, -1)
        return self._slots(self._table_cpu_BW, new_tok_BT, self.pool.block_size)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every key's slot, past then new, flat [B * (S + T)]; past validity [B, S])."""
        if self._gather is None:
            past_B = torch.tensor(self._past, dtype=torch.long)
            # Past keys: row b's token i sits at column S - past[b] + i (left padding).
            tok_BS = torch.arange(self._S).view(1, -1) - (self._S - past_B).view(-1, 1)
            past_slots_BS = self._slots(self._table_cpu_BW, tok_BS, self.pool.block_size)
            all_slots = torch.cat([past_slots_BS, self._new_slots_BT], dim=1).view(-1)
            self._gather = (all_slots.to(self._dev), (tok_BS >= 0).to(self._dev))
        return self._gather

    @staticmethod
    def _slots(table_BW: torch.Tensor, tok_BX: torch.Tensor, bs: int) -> torch.Tensor:
        """Flat page-slot index of each token (negative token index -> slot 0 of block 0)."""
        real_BX = tok_BX >= 0
        tok_BX = tok_BX.clamp(min=0)
        block_BX = table_BW.gather(1, (tok_BX // bs).clamp(max=table_BW.shape[1] - 1))
        return torch.where(real_BX, block_BX * bs + tok_BX % bs, 0)

    # ---------------------------------------------------------------- KVCache protocol
    @property
    def seq_len(self) -> int:
        return self._S

    @property
    def max_len(self) -> int:
        return self._S + self._T

    def key_valid(self) -> torch.Tensor | None:
        if min(self._past) == self._S:  # every row has S stored tokens: no padding
            return None
        return self._gathered()[1]

    def num_valid(self) -> torch.Tensor:
        return self._num_valid_B

    def write(self, layer_idx: int, k_BKTH: torch.Tensor, v_BKTH: torch.Tensor) -> None:
        """Store this forward's keys and values in the rows' pages."""
        B, K, T, H = k_BKTH.shape
        for pages, new_BKTH in ((self.pool.k[layer_idx], k_BKTH),
                                (self.pool.v[layer_idx], v_BKTH)):
            pages.view(-1, K, H).index_copy_(0, self._new_slots,
                                             new_BKTH.transpose(1, 2).reshape(B * T, K, H))

    def update(self, layer_idx: int, k_BKTH: torch.Tensor,
               v_BKTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(layer_idx, k_BKTH, v_BKTH)
        if self._S == 0:
            return k_BKTH, v_BKTH
        B, K, T, H = k_BKTH.shape
        all_slots = self._gathered()[0]
        return tuple(pages.view(-1, K, H).index_select(0, all_slots)
                     .view(B, self._S + T, K, H).transpose(1, 2)
                     for pages in (self.pool.k[layer_idx], self.pool.v[layer_idx]))

    def decode_pages(self, layer_idx: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a decode batch: (K pages, V pages, block table [B, W], keys per row [B]) of
        `kernels/paged_attention.decode`, after `write`; None for other batches."""
        if not self._decode:
            return None
        return self.pool.k[layer_idx], self.pool.v[layer_idx], self._table_BW, self._lens_B

    def decode_layout(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor,
                                     torch.Tensor, torch.Tensor] | None:
        """For a decode batch: (K pages per layer, V pages per layer, the new tokens' slots [B],
        block table [B, W], keys per row [B]): what `write` and `decode_pages` use, for all
        layers at once (`csrc/decode_layers.cpp`); None for other batches."""
        if not self._decode:
            return None
        return self.pool.k, self.pool.v, self._new_slots, self._table_BW, self._lens_B

    def advance(self, valid_BT: torch.Tensor | None, num_tokens: int) -> None:
        """Lengths are the engine's bookkeeping (`Sequence.num_computed`); nothing to do."""

    def sparse_state(self, layer_idx: int, factory) -> SparseLayerState:
        if self._seq_ids is None:
            raise ValueError("this PagedBatch was built without sequence ids; it cannot hold "
                             "InfLLM v2 decode state")
        buffers = [self.pool.sparse_layers(s)[layer_idx].buffers[0] for s in self._seq_ids]
        return SparseLayerState(buffers)


def token_layout(pool: BlockPool, block_tables: Sequence[Sequence[int]],
                 num_computed: Sequence[int], num_new: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every new token of a step as a row of its own, for the token-level step of bf16 CPU
    inference (`model/fast_decode.token_logits`): sequence s's num_new[s] tokens at
    positions num_computed[s] .. + num_new[s] - 1, sequences in order. Returns (positions
    [N], page slots [N], block table [N, W] (each token's sequence's), keys per token [N] =
    position + 1): a token attends to its sequence's keys up to itself, so that writing all
    of the step's keys first and then attending row by row in the pages is causal.
    All on the pool's device."""
    bs = pool.block_size
    pos, slots, rows = [], [], []
    for s, (table, c, n) in enumerate(zip(block_tables, num_computed, num_new)):
        if n < 1:
            raise ValueError("every sequence of a token-level step needs >= 1 new token")
        if (c + n - 1) // bs >= len(table):
            raise ValueError(f"a block table of {len(table)} pages cannot hold token "
                             f"{c + n - 1} (block size {bs})")
        for p in range(c, c + n):
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        rows += [s] * n
    width = max(1, max(len(t) for t in block_tables))
    table_SW = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables],
                            dtype=torch.long)
    pos_N = torch.tensor(pos, dtype=torch.long)
    dev = pool.k[0].device
    return (pos_N.to(dev), torch.tensor(slots, dtype=torch.long).to(dev),
            table_SW.index_select(0, torch.tensor(rows, dtype=torch.long)).to(dev),
            (pos_N + 1).to(dev))
