"""Dense GQA self-attention of a MiniCPM4 layer (spec §1.1), with HF parameter names.

Also carries the two MiniCPM-SALA switches of softmax layers (spec §3.2): NoPE
(`attn_use_rope=False`) and the sigmoid output gate (`attn_use_output_gate`, `o_gate`).
Shape legend: B batch, T tokens, D hidden, N query heads, K kv heads, H head dim, S keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minicpm4.kernels import fused_rotary, paged_attention
from minicpm4.kernels.attention import attention
from minicpm4.kernels.infllm_v2.api import SparseLayerState, infllm_v2_attention
from minicpm4.kernels.matmul import apply_linear, needs_training_kernels, train_linear
from minicpm4.model.cache import KVCache
from minicpm4.model.config import ModelConfig
from minicpm4.model.layers import apply_rotary, rotary_qkv, signed_sin


@dataclass
class AttentionInputs:
    """Per-forward state shared by every layer, built once by `MiniCPM4Model.forward`."""

    cos_BTH: torch.Tensor
    sin_BTH: torch.Tensor
    mask_B1TS: torch.Tensor | None
    """Boolean, True = may attend; None with `is_causal` or for unmasked decode."""
    is_causal: bool
    cache: KVCache | None
    key_start: list[int] | None = None
    """InfLLM v2 (config `sparse_config`): per row, the first real key position of this
    forward's keys (left padding before it); None when the model has no sparse config."""
    _signed_sin: torch.Tensor | None = field(default=None, init=False, repr=False,
                                             compare=False)

    def signed_sin_BTH(self) -> torch.Tensor:
        """`layers.signed_sin(sin_BTH)`, computed once per forward and shared by the layers."""
        if self._signed_sin is None:
            self._signed_sin = signed_sin(self.sin_BTH)
        return self._signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim_
        self.use_rope = cfg.attn_use_rope
        d, h = cfg.hidden_size, cfg.head_dim_
        self.q_proj = nn.Linear(d, self.num_heads * h, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * h, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * h, bias=False)
        self.o_proj = nn.Linear(self.num_heads * h, d, bias=False)
        self.o_gate = nn.Linear(d, self.num_heads * h, bias=False) \
            if cfg.attn_use_output_gate else None
        self.sparse = cfg.sparse_config  # InfLLM v2 (`SparseParams`), None = dense
        self.sparse_lse = "approx"
        """InfLLM v2 LSE mode of the selection: "approx" (coarse keys, CPM.cu's default) or
        "exact"."""
        self.sparse_backend = "auto"
        """InfLLM v2 stage-2 backend (`kernels.infllm_v2.stage2.BACKENDS`)."""

    def forward(self, x_BTD: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        nope = self.sparse is not None and self.sparse.use_nope
        if self.use_rope and inp.cache is None and not nope and needs_training_kernels(
                x_BTD, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight):
            # Training: one matmul for q|k|v, RoPE on q and k in one pass (layers.py). The
            # q/k/v modules are not called (their hooks do not run); the weights are theirs.
            w_FD = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            q_BNTH, k_BKSH, v_BKSH = rotary_qkv(train_linear(x_BTD, w_FD), inp.cos_BTH,
                                                inp.signed_sin_BTH(), self.num_heads,
                                                self.num_kv_heads)
            return self.finish(x_BTD, self._core(q_BNTH, k_BKSH, v_BKSH, inp))
        return self.finish(x_BTD, self.attend(*self.project(x_BTD), inp))

    # The three parts of the inference forward (also the training forward's, unfused).
    # `model/grouped.py` runs `project` and `finish` once over the tokens of several batches
    # and `attend` per batch.
    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections [B, T, N*H], [B, T, K*H], [B, T, K*H]."""
        return tuple(apply_linear(proj, x_BTD) for proj in (self.q_proj, self.k_proj,
                                                             self.v_proj))

    def attend(self, q_BTF: torch.Tensor, k_BTF: torch.Tensor, v_BTF: torch.Tensor,
               inp: AttentionInputs) -> torch.Tensor:
        """RoPE, the cache update and attention of one batch: [B, T, N*H] before o_proj."""
        B, T, _ = q_BTF.shape
        nope = self.sparse is not None and self.sparse.use_nope
        q_BTNH = q_BTF.view(B, T, self.num_heads, self.head_dim)
        k_BTKH = k_BTF.view(B, T, self.num_kv_heads, self.head_dim)
        q_BNTH, k_BKTH = q_BTNH.transpose(1, 2), k_BTKH.transpose(1, 2)
        v_BKTH = v_BTF.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        sel = (q_BNTH, k_BKTH) if nope else None  # use_nope: select with pre-RoPE q/k
        if self.use_rope and fused_rotary.applies(q_BTNH, inp.cos_BTH):  # bf16 CPU inference
            q_BNTH = fused_rotary.rotary(q_BTNH, inp.cos_BTH, inp.sin_BTH).transpose(1, 2)
            k_BKTH = fused_rotary.rotary(k_BTKH, inp.cos_BTH, inp.sin_BTH).transpose(1, 2)
        elif self.use_rope:
            q_BNTH = apply_rotary(q_BNTH, inp.cos_BTH, inp.sin_BTH)
            k_BKTH = apply_rotary(k_BKTH, inp.cos_BTH, inp.sin_BTH)
        paged = self._paged_decode(q_BNTH, k_BKTH, v_BKTH, inp)
        if paged is not None:
            return paged
        if inp.cache is not None:
            k_BKSH, v_BKSH = inp.cache.update(self.layer_idx, k_BKTH, v_BKTH)
        else:
            k_BKSH, v_BKSH = k_BKTH, v_BKTH
        return self._core(q_BNTH, k_BKSH, v_BKSH, inp, sel)

    def _paged_decode(self, q_BNTH: torch.Tensor, k_BKTH: torch.Tensor, v_BKTH: torch.Tensor,
                      inp: AttentionInputs) -> torch.Tensor | None:
        """Dense decode over the engine's pages in place (`kernels/paged_attention.py`), for
        bf16 CPU inference; None where it does not apply (the gathered path runs)."""
        if self.sparse is not None or q_BNTH.shape[2] != 1 or inp.cache is None:
            return None
        get_pages = getattr(inp.cache, "decode_pages", None)
        if get_pages is None or not paged_attention.applies(q_BNTH, k_BKTH):
            return None
        view = get_pages(self.layer_idx)
        if view is None:
            return None
        inp.cache.write(self.layer_idx, k_BKTH, v_BKTH)
        B, N = q_BNTH.shape[:2]
        out_BNH = paged_attention.decode(q_BNTH[:, :, 0], *view)
        return out_BNH.reshape(B, 1, N * self.head_dim)

    def finish(self, x_BTD: torch.Tensor, out_BTF: torch.Tensor) -> torch.Tensor:
        """The output gate (if any) and o_proj."""
        if self.o_gate is not None:
            out_BTF = out_BTF * torch.sigmoid(apply_linear(self.o_gate, x_BTD))
        return apply_linear(self.o_proj, out_BTF)

    def _core(self, q_BNTH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor,
              inp: AttentionInputs, sel: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
        B, _, T, _ = q_BNTH.shape
        if self.sparse is not None and inp.key_start is not None:
            out_BNTH = self._sparse(q_BNTH, k_BKSH, v_BKSH, inp, sel)
        else:
            out_BNTH = attention(q_BNTH, k_BKSH, v_BKSH, mask_B1TS=inp.mask_B1TS,
                                 is_causal=inp.is_causal)
        return out_BNTH.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)

    def _sparse(self, q_BNTH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor,
                inp: AttentionInputs, sel: tuple[torch.Tensor, torch.Tensor] | None
                ) -> torch.Tensor:
        """InfLLM v2 (spec §2): dense below `dense_len`, block-sparse above; decode keeps the
        compressed keys in the cache (`cache.sparse_state`)."""
        state = None
        if inp.cache is not None:
            get_state = getattr(inp.cache, "sparse_state", None)
            if get_state is None:
                raise ValueError(f"{type(inp.cache).__name__} cannot hold InfLLM v2 decode "
                                 "state (no sparse_state method)")
            state = get_state(self.layer_idx, SparseLayerState)
        q_sel = k_sel_new = k_sel = None
        if sel is not None:
            q_sel, k_sel_new = sel
            T, S = q_BNTH.shape[2], k_BKSH.shape[2]
            if T != S and (T > 1 or state is None or not state.buffers):
                raise ValueError("use_nope selection keeps only compressed pre-RoPE keys: "
                                 "prefill in one call from an empty cache, then decode one "
                                 "token at a time")
            k_sel = k_sel_new if T == S else None
        return infllm_v2_attention(q_BNTH, k_BKSH, v_BKSH, self.sparse, key_start=inp.key_start,
                                   state=state, lse=self.sparse_lse, q_sel_BNTH=q_sel,
                                   k_sel_new_BKTH=k_sel_new, k_sel_BKSH=k_sel,
                                   backend=self.sparse_backend)
