"""Multi-token-prediction (MTP) / EAGLE draft head and its loss (spec §1.4, §1.1.5, §8.3).

MiniCPM4 pre-trains with `L = L_NTP + λ·L_MTP`. The MTP head is one extra decoder layer that
predicts x_{t+2} from the trunk's final (normed) hidden state h_t and the next token x_{t+1}:

    u_t   = fc1(input_norm1(Emb(x_{t+1}))) + fc2(input_norm2(h_t))     # = Linear(concat)
    y_t   = DecoderLayer(u_t)      # RoPE, own attention/MLP, residual scale_depth/sqrt(L+1)
    logit = lm_head(norm(y_t) * dim_model_base / hidden)               # shared head, fp32

`Emb` is the model's shared embedding *including* the ×scale_emb factor (CPM.cu feeds the
embedding layer's output), and the shared `lm_head` is reached through
`MiniCPM4ForCausalLM.compute_logits`. fc1 has a bias and fc2 has none, as in CPM.cu's
`minicpm4_eagle.cuh`; together they are one Linear on `concat(norm1(emb), norm2(h))` whose
weight is `[fc1.weight | fc2.weight]` (`MTPHead.concat_linear`, CPM.cu's `fc.weight`/`fc.bias`
layout). The draft layer is layer L+1 of the μP depth rule (mup.residual_multiplier(cfg, L+1)).

Deviation to know about: the head ends with its own RMSNorm (`mtp.norm`) before the shared LM
head, so its output is the same kind of quantity as the trunk's h (normed) and can be fed back
as h for EAGLE recursion. CPM.cu applies the LM head to the draft layer output directly; a
converter for the released EAGLE weights must account for that.

Checkpoint tensor names (prefix `mtp.`; present only when config `num_mtp_layers` is 1):

    mtp.input_norm1.weight                  [D]     RMSNorm on Emb(x_{t+1})
    mtp.input_norm2.weight                  [D]     RMSNorm on h_t
    mtp.fc1.weight [D, D], mtp.fc1.bias [D]         applied to the normed embedding
    mtp.fc2.weight [D, D]                           applied to the normed hidden state
    mtp.layers.0.input_layernorm.weight, mtp.layers.0.post_attention_layernorm.weight
    mtp.layers.0.self_attn.{q,k,v,o}_proj.weight    (+ o_gate with attn_use_output_gate)
    mtp.layers.0.mlp.{gate,up,down}_proj.weight
    mtp.norm.weight                         [D]     final RMSNorm before the shared lm_head

The draft layer's attention has `layer_idx` 0: at inference it keeps its own one-layer KV cache
(spec §8 item 3 adds a 1024-token sliding window there; that is the speculative decoder's job).

Loss: `ntp_mtp_loss(logits, mtp_logits, labels, lam)`. Labels are HF-style, *unshifted*
(normally the input ids, -100 where ignored): logits[:, t] is scored against labels[:, t+1]
and mtp_logits[:, t] against labels[:, t+2]. λ is not given by the paper (spec §9); the default
`DEFAULT_MTP_WEIGHT = 0.3` is our choice, DeepSeek-V3's MTP weight for most of its
pre-training. Shape legend: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpm4.kernels.matmul import apply_linear
from minicpm4.model import mup
from minicpm4.model.attention import AttentionInputs
from minicpm4.model.config import ModelConfig
from minicpm4.model.layers import RMSNorm
from minicpm4.model.transformer import DecoderLayer

DEFAULT_MTP_WEIGHT = 0.3
"""λ in L = L_NTP + λ·L_MTP. Not published for MiniCPM4 (spec §1.4, §9); 0.3 is our choice."""

IGNORE_INDEX = -100


class MTPHead(nn.Module):
    """One-layer MTP / EAGLE draft head (spec §1.4); the embedding and LM head are shared."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm1 = RMSNorm(d, eps)
        self.input_norm2 = RMSNorm(d, eps)
        self.fc1 = nn.Linear(d, d, bias=True)
        self.fc2 = nn.Linear(d, d, bias=False)
        scale = mup.residual_multiplier(cfg, cfg.num_hidden_layers + 1)
        self.layers = nn.ModuleList([DecoderLayer(cfg, 0, residual_scale=scale)])
        self.norm = RMSNorm(d, eps)

    def fuse(self, h_BTD: torch.Tensor, next_emb_BTD: torch.Tensor) -> torch.Tensor:
        """u = fc1(input_norm1(Emb(x_{t+1}))) + fc2(input_norm2(h_t)), [B, T, D]."""
        return apply_linear(self.fc1, self.input_norm1(next_emb_BTD)) + \
            apply_linear(self.fc2, self.input_norm2(h_BTD))

    def forward(self, h_BTD: torch.Tensor, next_emb_BTD: torch.Tensor,
                inp: AttentionInputs) -> torch.Tensor:
        """Normed draft hidden states [B, T, D]; `compute_logits` of them predicts x_{t+2}.

        Args:
            h_BTD: the trunk's final normed hidden states at positions t.
            next_emb_BTD: the shared embedding (×scale_emb) of the tokens x_{t+1}.
            inp: RoPE tables, mask and optional one-layer cache for the draft tokens.
        """
        if h_BTD.shape != next_emb_BTD.shape:
            raise ValueError(f"h {tuple(h_BTD.shape)} and next-token embedding "
                             f"{tuple(next_emb_BTD.shape)} must have the same shape")
        x_BTD = self.fuse(h_BTD, next_emb_BTD)
        for layer in self.layers:
            x_BTD = layer(x_BTD, inp)
        return self.norm(x_BTD)

    @torch.no_grad()
    def concat_linear(self) -> nn.Linear:
        """The equivalent Linear(2D -> D) on concat(norm1(emb), norm2(h)) (CPM.cu `fc`)."""
        d = self.fc1.in_features
        w = self.fc1.weight
        fused = nn.Linear(2 * d, d, bias=True, device=w.device, dtype=w.dtype)
        fused.weight.copy_(torch.cat([self.fc1.weight, self.fc2.weight], dim=1))
        fused.bias.copy_(self.fc1.bias)
        return fused


def _shifted_ce(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    """Mean fp32 cross-entropy over non-ignored targets (0 with a graph if there are none)."""
    if logits_BTV.shape[:2] != targets_BT.shape:
        raise ValueError(f"logits {tuple(logits_BTV.shape)} do not line up with targets "
                         f"{tuple(targets_BT.shape)}")
    total = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(),
                            ignore_index=ignore_index, reduction="sum")
    count = (targets_BT != ignore_index).sum().clamp(min=1)
    return total / count


def ntp_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token loss: logits[:, t] (t < T-1) against labels[:, t+1]."""
    if logits_BTV.shape[1] != labels_BT.shape[1]:
        raise ValueError(f"logits cover {logits_BTV.shape[1]} positions, labels "
                         f"{labels_BT.shape[1]}; expected the same")
    return _shifted_ce(logits_BTV[:, :-1], labels_BT[:, 1:], ignore_index)


def mtp_loss(mtp_logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MTP loss: mtp_logits[:, t] against labels[:, t+2].

    `mtp_logits` comes from `forward_with_mtp` and has T-1 columns (column t saw h_t and
    x_{t+1}); its last column has no target inside the sequence and is not scored.
    """
    if mtp_logits_BTV.shape[1] != labels_BT.shape[1] - 1:
        raise ValueError(f"mtp_logits cover {mtp_logits_BTV.shape[1]} positions; expected "
                         f"labels length - 1 = {labels_BT.shape[1] - 1}")
    return _shifted_ce(mtp_logits_BTV[:, :-1], labels_BT[:, 2:], ignore_index)


def ntp_mtp_loss(logits_BTV: torch.Tensor, mtp_logits_BTV: torch.Tensor,
                 labels_BT: torch.Tensor, lam: float = DEFAULT_MTP_WEIGHT, *,
                 ignore_index: int = IGNORE_INDEX
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ntp, mtp) with total = ntp + lam * mtp (spec §1.4); labels unshifted."""
    ntp = ntp_loss(logits_BTV, labels_BT, ignore_index=ignore_index)
    mtp = mtp_loss(mtp_logits_BTV, labels_BT, ignore_index=ignore_index)
    return ntp + lam * mtp, ntp, mtp
