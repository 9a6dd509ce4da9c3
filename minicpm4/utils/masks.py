"""Attention masks shared by the data pipeline and the model (spec §5 packing): the
block-causal-within-document mask of a packed window. `data/packing.py` re-exports it and
`model/transformer.py` applies it when a forward gets `doc_ids_BT`.
"""

from __future__ import annotations

import torch


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal-within-document attention mask (reference implementation).

    Args:
        doc_ids: [T] or [B, T] document ids (as from `segments` / the loader).
    Returns:
        bool [T, T] or [B, T, T]: ``mask[..., q, k] = k <= q and doc_ids[q] == doc_ids[k]``
        (True = may attend). For `kernels.attention`'s ``mask_B1TS`` use ``mask.unsqueeze(1)``.
    """
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids must be [T] or [B, T], got shape {tuple(doc_ids.shape)}")
    T = doc_ids.shape[-1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc_BTT = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return same_doc_BTT & causal_TT
