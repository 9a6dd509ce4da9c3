"""The MiniCPM4 decoder: `DecoderLayer`, `MiniCPM4Model`, `MiniCPM4ForCausalLM` (spec §1.1).

Module and parameter names are those of the HF `modeling_minicpm.py`, so official checkpoints
load by name. μP scalars come from `model/mup.py`. Shape legend: B batch, T tokens, D hidden,
S keys (cached + new), V vocabulary.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from minicpm4.kernels import fused_norm
from minicpm4.kernels.linear_ce import IGNORE_INDEX, linear_cross_entropy
from minicpm4.kernels.matmul import apply_linear
from minicpm4.model import mup
from minicpm4.model.attention import Attention, AttentionInputs
from minicpm4.model.cache import KVCache
from minicpm4.model.config import ModelConfig
from minicpm4.model.layers import MLP, RMSNorm, RotaryEmbedding
from minicpm4.utils.masks import document_causal_mask



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
        return self.block(x_BTD, lambda h_BTD: self.self_attn(h_BTD, inp))

    def block(self, x_BTD: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        """The layer around its token mixer `mix` (normed input -> attention output); bf16
        CPU inference fuses the norms with the residual add (kernels/fused_norm.py).
        `model/grouped.py` passes a mixer that attends per batch."""
        h_BTD = fused_norm.rms_norm(x_BTD, self.input_layernorm)
        x_BTD, h_BTD = fused_norm.add_rms_norm(x_BTD, mix(h_BTD), self.residual_scale,
                                               self.post_attention_layernorm)
        return x_BTD + self.mlp(h_BTD) * self.residual_scale


def _key_valid(valid_BT: torch.Tensor | None, cache: KVCache | None, batch: int, num_new: int,
               device: torch.device) -> torch.Tensor | None:
    """[B, cached + new] bool, False at padding keys (the cache's, then this forward's); None
    when no key is padding."""
    past_valid_BS = cache.key_valid() if cache is not None else None
    if valid_BT is None and past_valid_BS is None:
        return None
    past = cache.seq_len if cache is not None else 0
    key_valid_BS = torch.ones(batch, past + num_new, dtype=torch.bool, device=device)
    if past_valid_BS is not None:
        key_valid_BS[:, :past] = past_valid_BS
    if valid_BT is not None:
        key_valid_BS[:, past:] = valid_BT
    return key_valid_BS


def _single_document(doc_ids_BT: torch.Tensor) -> bool:
    return bool((doc_ids_BT == doc_ids_BT[:, :1]).all())


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
    key_valid_BS = _key_valid(valid_BT, cache, batch, num_new, device)
    if key_valid_BS is None:
        if num_new == 1:
            return positions_BT, None, False
        if past == 0:
            return positions_BT, None, True
    q_T1 = torch.arange(num_new, device=device).view(-1, 1) + past
    k_1S = torch.arange(past + num_new, device=device).view(1, -1)
    mask_B1TS = (k_1S <= q_T1).expand(batch, 1, num_new, past + num_new)
    if key_valid_BS is not None:
        mask_B1TS = mask_B1TS & key_valid_BS.view(batch, 1, 1, -1)
        mask_B1TS = mask_B1TS | (k_1S == q_T1)
    return positions_BT, mask_B1TS, False


def _document_mask(doc_ids_BT: torch.Tensor, shape: torch.Size, mask_B1TS: torch.Tensor | None,
                   is_causal: bool, cache: KVCache | None
                   ) -> tuple[torch.Tensor | None, bool]:
    """Restrict attention to the query's own document of a packed window (spec §5 packing):
    query t sees key s <= t only where doc_ids[s] == doc_ids[t]. A window of one document
    keeps the plain causal path."""
    if doc_ids_BT.shape != shape:
        raise ValueError(f"doc_ids shape {tuple(doc_ids_BT.shape)} != input_ids shape "
                         f"{tuple(shape)}")
    if cache is not None:
        raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
    if _single_document(doc_ids_BT):
        return mask_B1TS, is_causal
    doc_B1TT = document_causal_mask(doc_ids_BT).unsqueeze(1)
    return (doc_B1TT if mask_B1TS is None else doc_B1TT & mask_B1TS), False


def _sparse_key_start(valid_BT: torch.Tensor | None, cache: KVCache | None,
                      doc_ids_BT: torch.Tensor | None, B: int, T: int,
                      device: torch.device) -> list[int]:
    """First real key position per row for InfLLM v2 (spec §2): real keys must form a suffix
    (left padding only) and a row must hold one document."""
    if doc_ids_BT is not None and not _single_document(doc_ids_BT):
        raise ValueError("InfLLM v2 sparse attention does not support packed documents; give "
                         "one document per row")
    key_valid_BS = _key_valid(valid_BT, cache, B, T, device)
    if key_valid_BS is None:
        return [0] * B
    starts_B = key_valid_BS.shape[1] - key_valid_BS.sum(dim=1)
    for b, start in enumerate(starts_B.tolist()):
        if not bool(key_valid_BS[b, start:].all()):
            raise ValueError("InfLLM v2 sparse attention needs left padding (row "
                             f"{b} has padding after real tokens)")
    return starts_B.tolist()


class LossSums(NamedTuple):
    """fp32 sums of cross-entropy over the non-ignored targets (training forward)."""

    ntp: torch.Tensor
    """Next-token loss: position t against labels[:, t]."""
    mtp: torch.Tensor | None
    """MTP loss (spec §1.4) against mtp_labels[:, t] (= token t+2), when asked for."""


class MiniCPM4Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        unsupported = sorted(set(cfg.layer_mixers) - {"minicpm4"})
        if unsupported:
            raise ValueError(f"mixer_types {unsupported} are not supported by this model yet; "
                             "only 'minicpm4' (softmax attention) layers can be built")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.embed_scale = mup.embedding_multiplier(cfg)

    def forward(self, input_ids_BT: torch.Tensor, *, attention_mask_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, D]; see `MiniCPM4ForCausalLM.forward`."""
        inp, valid_BT = self.attention_inputs(input_ids_BT, attention_mask_BT=attention_mask_BT,
                                              positions_BT=positions_BT, cache=cache,
                                              doc_ids_BT=doc_ids_BT)
        T = input_ids_BT.shape[1]
        x_BTD = self.embed_tokens(input_ids_BT) * self.embed_scale
        for layer in self.layers:
            x_BTD = layer(x_BTD, inp)
        if cache is not None:
            cache.advance(valid_BT, T)
        return self.norm(x_BTD)

    def attention_inputs(self, input_ids_BT: torch.Tensor, *,
                         attention_mask_BT: torch.Tensor | None = None,
                         positions_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                         doc_ids_BT: torch.Tensor | None = None
                         ) -> tuple[AttentionInputs, torch.Tensor | None]:
        """Checks the inputs of one forward and builds what every layer shares: positions,
        RoPE tables, the attention mask, InfLLM v2's key starts. Also returns the padding
        mask (None when no token is padding). `model/grouped.py` calls it per batch."""
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
        if doc_ids_BT is not None:
            mask_B1TS, is_causal = _document_mask(doc_ids_BT, input_ids_BT.shape, mask_B1TS,
                                                  is_causal, cache)
        cos_BTH, sin_BTH = self.rotary_emb(positions)
        inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=mask_B1TS,
                              is_causal=is_causal, cache=cache)
        if self.config.sparse_config is not None:
            inp.key_start = _sparse_key_start(valid_BT, cache, doc_ids_BT, B, T,
                                              input_ids_BT.device)
        return inp, valid_BT


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
                logits_to_keep: int = 0, doc_ids_BT: torch.Tensor | None = None,
                labels_BT: torch.Tensor | None = None,
                mtp_labels_BT: torch.Tensor | None = None) -> torch.Tensor | LossSums:
        """fp32 logits [B, T', V] (T' = T, or the last `logits_to_keep` positions if > 0);
        with `labels_BT`, the training losses instead (`LossSums`, no logits kept).

        Args:
            input_ids_BT: token ids [B, T].
            attention_mask_BT: 1/True for real tokens, 0/False for padding (left padding).
            positions_BT: explicit RoPE positions; by default counted over non-padding tokens.
            cache: a `KVCache`; the new tokens are appended to it.
            doc_ids_BT: document ids of a packed window; attention stays inside a document.
            labels_BT: *shifted* targets (labels[:, t] is the token after position t, -100 =
                ignored): return the summed next-token cross-entropy through the fused LM-head
                loss (`kernels/linear_ce.py`). Training goes through `forward` so that DDP and
                FSDP2 see it.
            mtp_labels_BT: [B, T-1] targets of the MTP head (token t+2 at column t); needs
                `labels_BT` and an MTP head.
        """
        if labels_BT is not None:
            return self._loss_sums(input_ids_BT, labels_BT, mtp_labels_BT,
                                   attention_mask_BT=attention_mask_BT, positions_BT=positions_BT,
                                   doc_ids_BT=doc_ids_BT)
        if mtp_labels_BT is not None:
            raise ValueError("mtp_labels_BT needs labels_BT")
        h_BTD = self.model(input_ids_BT, attention_mask_BT=attention_mask_BT,
                           positions_BT=positions_BT, cache=cache, doc_ids_BT=doc_ids_BT)
        if logits_to_keep > 0:
            h_BTD = h_BTD[:, -logits_to_keep:]
        return self.compute_logits(h_BTD)

    def compute_logits(self, h_BTD: torch.Tensor, *, keep_dtype: bool = False) -> torch.Tensor:
        """fp32 logits of final (normed) hidden states: lm_head(h * dim_model_base / hidden);
        in the model's dtype with `keep_dtype` (the engine widens only what it needs)."""
        logits = apply_linear(self.lm_head, h_BTD * self.logit_scale)
        return logits if keep_dtype else logits.float()

    def forward_with_mtp(self, input_ids_BT: torch.Tensor, *,
                         attention_mask_BT: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with the MTP head (spec §1.4): (logits [B, T, V], mtp [B, T-1, V]), fp32.

        The trunk runs once; the head sees (h_t, x_{t+1}) for t < T-1, so `mtp[:, t]` predicts
        `input_ids[:, t+2]` (the last column has no target; see `mtp.ntp_mtp_loss`).
        Training uses `forward(labels_BT=..., mtp_labels_BT=...)` instead (no logits kept).
        """
        self._check_mtp(input_ids_BT)
        h_BTD = self.model(input_ids_BT, attention_mask_BT=attention_mask_BT)
        draft_BTD = self._mtp_hidden(h_BTD, input_ids_BT, attention_mask_BT=attention_mask_BT)
        return self.compute_logits(h_BTD), self.compute_logits(draft_BTD)

    def _check_mtp(self, input_ids_BT: torch.Tensor) -> None:
        if self.mtp is None:
            raise ValueError("this model has no MTP head (config field 'num_mtp_layers' is 0)")
        if input_ids_BT.dim() != 2 or input_ids_BT.shape[1] < 2:
            raise ValueError(f"MTP needs [batch, >= 2 tokens] input, got "
                             f"{tuple(input_ids_BT.shape)}")

    def _mtp_hidden(self, h_BTD: torch.Tensor, input_ids_BT: torch.Tensor, *,
                    attention_mask_BT: torch.Tensor | None = None,
                    positions_BT: torch.Tensor | None = None,
                    doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Normed draft states [B, T-1, D] of the MTP head. Draft token t sits at the trunk's
        RoPE position t and attends causally to draft tokens <= t (of its document, with
        `doc_ids_BT`); it is valid where both t and t+1 are real tokens."""
        B, T = input_ids_BT.shape
        valid_BT = None
        if attention_mask_BT is not None:
            valid_BT = attention_mask_BT.bool()[:, :-1] & attention_mask_BT.bool()[:, 1:]
            valid_BT = None if bool(valid_BT.all()) else valid_BT
        positions, mask_B1TS, is_causal = _positions_and_mask(
            batch=B, num_new=T - 1, valid_BT=valid_BT, cache=None, device=input_ids_BT.device)
        if positions_BT is not None:
            positions = positions_BT[:, :-1]
        if doc_ids_BT is not None:
            mask_B1TS, is_causal = _document_mask(doc_ids_BT[:, :-1], (B, T - 1), mask_B1TS,
                                                  is_causal, None)
        cos_BTH, sin_BTH = self.model.rotary_emb(positions)
        inp = AttentionInputs(cos_BTH=cos_BTH, sin_BTH=sin_BTH, mask_B1TS=mask_B1TS,
                              is_causal=is_causal, cache=None)
        next_emb_BTD = self.model.embed_tokens(input_ids_BT[:, 1:]) * self.model.embed_scale
        return self.mtp(h_BTD[:, :-1], next_emb_BTD, inp)

    def _loss_sums(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
                   mtp_labels_BT: torch.Tensor | None, **kw: torch.Tensor | None) -> LossSums:
        """Summed CE of the LM head (and the MTP head) via `linear_cross_entropy`."""
        if labels_BT.shape != input_ids_BT.shape:
            raise ValueError(f"labels shape {tuple(labels_BT.shape)} != input_ids shape "
                             f"{tuple(input_ids_BT.shape)}")
        h_BTD = self.model(input_ids_BT, **kw)
        ntp = self._ce_sum(h_BTD, labels_BT)
        if mtp_labels_BT is None:
            return LossSums(ntp, None)
        self._check_mtp(input_ids_BT)
        B, T = input_ids_BT.shape
        if mtp_labels_BT.shape != (B, T - 1):
            raise ValueError(f"mtp_labels must be [{B}, {T - 1}], got "
                             f"{tuple(mtp_labels_BT.shape)}")
        draft_BTD = self._mtp_hidden(h_BTD, input_ids_BT, **kw)
        return LossSums(ntp, self._ce_sum(draft_BTD, mtp_labels_BT))

    def _ce_sum(self, h_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h_BTD.flatten(0, 1), self.lm_head.weight,
                                    labels_BT.flatten(), scale=self.logit_scale,
                                    ignore_index=IGNORE_INDEX, reduction="sum")

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
