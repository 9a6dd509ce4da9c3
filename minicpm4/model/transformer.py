"""The MiniCPM4 decoder: `DecoderLayer`, `MiniCPM4Model`, `MiniCPM4ForCausalLM` (spec §1.1).

Module and parameter names are those of the HF `modeling_minicpm.py`, so official checkpoints
load by name. μP scalars come from `model/mup.py`. Shape legend: B batch, T tokens, D hidden,
S keys (cached + new), V vocabulary.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from minicpm4.model import mup
from minicpm4.model.attention import Attention, AttentionInputs
from minicpm4.model.cache import KVCache
from minicpm4.model.config import ModelConfig
from minicpm4.model.layers import MLP, RMSNorm, RotaryEmbedding

log = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """Pre-norm block: x += a*Attn(norm(x)); x += a*MLP(norm(x)), a = scale_depth/sqrt(L).

    `residual_scale` overrides a (the MTP draft layer uses scale_depth/sqrt(L+1), spec §1.4);
    `layer_idx` is the slot of this layer in the KV cache it is given.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, *,
                 residual_scale: float | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_scale = mup.residual_multiplier(cfg) if residual_scale is None \
            else residual_scale

    def forward(self, x_BTD: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), inp) * self.residual_scale
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)) * self.residual_scale


def _positions_and_mask(*, batch: int, num_new: int, valid_BT: torch.Tensor | None,
                        cache: KVCache | None, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """RoPE positions [B, T] and the attention mask for this forward.

    Padding (valid False) takes no position and is never attended to; each new token also
    attends to itself so that rows of padding stay finite.
    """
    past = cache.seq_len if cache is not None else 0
    base_B1 = cache.num_valid().view(-1, 1) if cache is not None else \
        torch.zeros(batch, 1, dtype=torch.long, device=device)
    if valid_BT is None:
        positions_BT = base_B1 + torch.arange(num_new, device=device)
    else:
        positions_BT = base_B1 + (valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)
    past_valid_BS = cache.key_valid() if cache is not None else None
    if valid_BT is None and past_valid_BS is None:
        if num_new == 1:
            return positions_BT, None, False
        if past == 0:
            return positions_BT, None, True
    q_T1 = torch.arange(num_new, device=device).view(-1, 1) + past
    k_1S = torch.arange(past + num_new, device=device).view(1, -1)
    mask_B1TS = (k_1S <= q_T1).expand(batch, 1, num_new, past + num_new)
    if valid_BT is not None or past_valid_BS is not None:
        ones = torch.ones(batch, past + num_new, dtype=torch.bool, device=device)
        key_valid_BS = ones
        if past_valid_BS is not None:
            key_valid_BS[:, :past] = past_valid_BS
        if valid_BT is not None:
            key_valid_BS[:, past:] = valid_BT
        mask_B1TS = mask_B1TS & key_valid_BS.view(batch, 1, 1, -1)
        mask_B1TS = mask_B1TS | (k_1S == q_T1)
    return positions_BT, mask_B1TS, False


class MiniCPM4Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        unsupported = sorted(set(cfg.layer_mixers) - {"minicpm4"})
        if unsupported:
            raise ValueError(f"mixer_types {unsupported} are not supported by this model yet; "
                             "only 'minicpm4' (softmax attention) layers can be built")
        if cfg.sparse_config is not None:
            log.warning("sparse_config is set but InfLLM v2 sparse attention is not available "
                        "in this build: every layer attends densely (exact, slower on long "
                        "inputs)")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.embed_scale = mup.embedding_multiplier(cfg)

    def forward(self, input_ids_BT: torch.Tensor, *, attention_mask_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, D]; see `MiniCPM4ForCausalLM.forward`."""
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids_BT.shape)}")
        B, T = input_ids_BT.shape
        if T == 0:
            raise ValueError("input_ids has no tokens")
        if int(input_ids_BT.min()) < 0 or int(input_ids_BT.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{int(input_ids_BT.min())}, {int(input_ids_BT.max())}]")
        if cache is not None and cache.seq_len + T > cache.max_len:
            raise ValueError(f"{cache.seq_len} cached + {T} new tokens exceed the cache "
                             f"capacity of {cache.max_len}")
        valid_BT = None
        if attention_mask_BT is not None:
            if attention_mask_BT.shape != input_ids_BT.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask_BT.shape)} != "
                                 f"input_ids shape {tuple(input_ids_BT.shape)}")
            valid_BT = attention_mask_BT.bool()
            if bool(valid_BT.all()):
                valid_BT = None
        positions, mask_B1TS, is_causal = _positions_and_mask(
            batch=B, num_new=T, valid_BT=valid_BT, cache=cache, device=input_ids_BT.device)
        if positions_BT is not None:
            positions = positions_BT
        cos_BTH, sin_BTH = self.rotary_emb(positions)
        inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=mask_B1TS,
                              is_causal=is_causal, cache=cache)
        x_BTD = self.embed_tokens(input_ids_BT) * self.embed_scale
        for layer in self.layers:
            x_BTD = layer(x_BTD, inp)
        if cache is not None:
            cache.advance(valid_BT, T)
        return self.norm(x_BTD)


class MiniCPM4ForCausalLM(nn.Module):
    """MiniCPM4 with its LM head; logits = lm_head(h * dim_model_base / hidden_size).

    With `num_mtp_layers == 1` it also owns `mtp`, the multi-token-prediction draft head of
    spec §1.4 (`model/mtp.py`); otherwise `mtp` is None and nothing else changes.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MiniCPM4Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.logit_scale = mup.logit_multiplier(cfg)
        self.mtp = None
        if cfg.num_mtp_layers == 1:
            from minicpm4.model.mtp import MTPHead  # mtp.py builds on DecoderLayer (this file)
            self.mtp = MTPHead(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random μP init by parameter role (`mup.init_model_`): hidden matrices std
        initializer_range/sqrt(m), embeddings and LM head initializer_range, norms 1."""
        mup.init_model_(self, "mup", seed)

    def forward(self, input_ids_BT: torch.Tensor, *, attention_mask_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """fp32 logits [B, T', V] (T' = T, or the last `logits_to_keep` positions if > 0).

        Args:
            input_ids_BT: token ids [B, T].
            attention_mask_BT: 1/True for real tokens, 0/False for padding (left padding).
            positions_BT: explicit RoPE positions; by default counted over non-padding tokens.
            cache: a `KVCache`; the new tokens are appended to it.
        """
        h_BTD = self.model(input_ids_BT, attention_mask_BT=attention_mask_BT,
                           positions_BT=positions_BT, cache=cache)
        if logits_to_keep > 0:
            h_BTD = h_BTD[:, -logits_to_keep:]
        return self.compute_logits(h_BTD)

    def compute_logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final (normed) hidden states: lm_head(h * dim_model_base / hidden)."""
        return self.lm_head(h_BTD * self.logit_scale).float()

    def forward_with_mtp(self, input_ids_BT: torch.Tensor, *,
                         attention_mask_BT: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward with the MTP head (spec §1.4): (logits [B, T, V], mtp [B, T-1, V]).

        The trunk runs once; the head sees (h_t, x_{t+1}) for t < T-1, so `mtp[:, t]` predicts
        `input_ids[:, t+2]` (the last column has no target; see `mtp.ntp_mtp_loss`). The MTP
        token t sits at RoPE position t of the trunk and attends causally to MTP tokens <= t;
        it is valid where both t and t+1 are real tokens. Both logits are fp32.
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP head (config field 'num_mtp_layers' is 0)")
        B, T = input_ids_BT.shape
        if T < 2:
            raise ValueError(f"MTP needs at least 2 tokens per row, got {T}")
        h_BTD = self.model(input_ids_BT, attention_mask_BT=attention_mask_BT)
        valid_BT = None
        if attention_mask_BT is not None:
            valid_BT = attention_mask_BT.bool()[:, :-1] & attention_mask_BT.bool()[:, 1:]
            valid_BT = None if bool(valid_BT.all()) else valid_BT
        positions_BT, mask_B1TS, is_causal = _positions_and_mask(
            batch=B, num_new=T - 1, valid_BT=valid_BT, cache=None, device=input_ids_BT.device)
        cos_BTH, sin_BTH = self.model.rotary_emb(positions_BT)
        inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=mask_B1TS,
                              is_causal=is_causal, cache=None)
        next_emb_BTD = self.model.embed_tokens(input_ids_BT[:, 1:]) * self.model.embed_scale
        draft_BTD = self.mtp(h_BTD[:, :-1], next_emb_BTD, inp)
        return self.compute_logits(h_BTD), self.compute_logits(draft_BTD)

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> MiniCPM4ForCausalLM:
        """Load an HF checkpoint folder; see `model.checkpoint.load_pretrained`."""
        from minicpm4.model.checkpoint import load_pretrained
        return load_pretrained(folder, **kwargs)

    def save_pretrained(self, folder, **kwargs) -> None:
        """Write an HF checkpoint folder; see `model.checkpoint.save_pretrained`."""
        from minicpm4.model.checkpoint import save_pretrained
        save_pretrained(self, folder, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
