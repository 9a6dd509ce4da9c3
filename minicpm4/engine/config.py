"""`EngineConfig`: the serving engine's knobs (issue 5; spec §4.1 "static memory planning",
"chunked prefill"). Frozen and validated; `LLM` reads it once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV block (page) of the block pool."""
    num_kv_blocks: int | None = None
    """Blocks in the pool; None: as many as `kv_cache_bytes` pays for."""
    kv_cache_bytes: int = 512 * 2**20
    """Memory budget of the pool (K, V and InfLLM v2's compressed keys) when num_kv_blocks is
    None."""
    max_num_seqs: int = 32
    """Requests running at once (the decode batch)."""
    max_num_batched_tokens: int = 2048
    """Tokens computed per engine step, over all requests (decode tokens + prefill chunks)."""
    max_prefill_chunk: int = 512
    """Longest prefill piece of one request in one step (chunked prefill)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of an earlier request's identical prompt prefix."""
    max_queued_requests: int = 4096
    """Requests waiting for a slot beyond which `add_request` refuses new ones
    (`EngineBusyError`, HTTP 503) instead of queueing without bound."""
    max_model_len: int | None = None
    """Prompt + generated tokens per request; None: the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 2,
             "num_kv_blocks must be >= 2 (block 0 is reserved)"),
            (self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_prefill_chunk >= 1, "max_prefill_chunk must be >= 1"),
            (self.max_queued_requests >= 1, "max_queued_requests must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2,
             "max_model_len must be >= 2"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"EngineConfig: {msg}")
