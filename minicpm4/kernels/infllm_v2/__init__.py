"""InfLLM v2 trainable block-sparse attention (spec §2): block selection (`selection.py`, decode steps in `decode_selection.py`) and,
in `stage2.py`, the sparse attention over the selected blocks. Rules: docs/infllm_v2_selection.md.
"""

from minicpm4.kernels.infllm_v2.decode_selection import CompressedKeyBuffer, select_blocks_decode
from minicpm4.kernels.infllm_v2.params import SparseParams
from minicpm4.kernels.infllm_v2.selection import (
    LSE_MODES,
    block_scores,
    compress_keys,
    select_blocks,
    select_blocks_chunked,
    select_blocks_varlen,
    stage1_scores,
)
from minicpm4.kernels.infllm_v2.stage2 import sparse_attention

__all__ = [
    "LSE_MODES",
    "CompressedKeyBuffer",
    "SparseParams",
    "block_scores",
    "compress_keys",
    "select_blocks",
    "select_blocks_chunked",
    "select_blocks_decode",
    "select_blocks_varlen",
    "sparse_attention",
    "stage1_scores",
]
