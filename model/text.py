"""BERT text + fusion encoder with an MLM head, parameter names compatible with HF BERT.

Why our own layers: transformers' BertLayer only cross-attends as a causal decoder; ALBEF's fusion layers
are bidirectional self-attention -> cross-attention to image tokens -> FFN, all post-LN. The module tree
reproduces HF's names (`embeddings.*`, `encoder.layer.N.attention.self.query`, ..., `cls.predictions.*`)
so `bert-base-uncased` weights load by name; `crossattention.*` (layers >= fusion_layer) are new.

The MLM decoder is tied structurally: logits = h @ word_embeddings.weight.T + cls.predictions.bias, so
there is no separate `decoder.weight` parameter that a state-dict load could untie.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TextConfig

__all__ = ["TextEncoder", "build_text_encoder", "Mode"]

Mode = Literal["text", "fusion", "full"]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence of {seq_len} tokens exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        # same summation order as HF/official: (words + token types) + positions
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention via SDPA; keys/values from `context` (cross) or from the queries' own tokens."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, H, N, d/H]

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D], context [B, N, Dkv], mask bool [B, 1, 1, N] (True = attend) or None."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)  # [B, L, D]


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # post-LN


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU = HF "gelu"


class BertOutput(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention to image tokens, fusion layers only) -> FFN; post-LN."""

    def __init__(self, cfg: TextConfig, cross_attention: bool) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_width) if cross_attention else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor | None, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            if image is None:
                raise ValueError("a fusion layer needs image_embeds to cross-attend to")
            x = self.crossattention(x, image, image_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i >= cfg.fusion_layer) for i in range(cfg.num_layers)])


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """`transform` + the output-only `bias`; the decoder weight is the word-embedding matrix (tied)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, N] 1/0 -> bool [B, 1, 1, N] for SDPA (True = attend); None when nothing is masked."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention mask must be [B, N], got {tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]


class TextEncoder(nn.Module):
    """BERT (no pooler) whose layers split into a text part and a fusion part, plus the MLM head (optional).

    Modes of `forward`:
      - "text":   embeddings + layers [0, fusion_layer)                    (unimodal text features)
      - "fusion": layers [fusion_layer, num_layers) on given text hidden states, cross-attending to the image
      - "full":   embeddings + all layers (the MLM path)
    """

    def __init__(self, config: TextConfig, *, with_mlm_head: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        # retrieval fine-tuning has no MLM loss, and fine-tuned checkpoints carry no head
        self.cls: BertOnlyMLMHead | None = BertOnlyMLMHead(config) if with_mlm_head else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # HF BERT init (std initializer_range = 0.02), or fan-in Linear weights (config.weight_init);
        # it matters only for the layers not loaded from a checkpoint
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.config.initializer_range
            if isinstance(module, nn.Linear) and self.config.weight_init == "fan_in":
                std = module.in_features**-0.5
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        mode: Mode = "text",
    ) -> torch.Tensor:
        """Inputs:
            input_ids [B, L] ("text"/"full") or hidden [B, L, D] ("fusion"); attention_mask [B, L] (1 = token);
            image_embeds [B, N, encoder_width] and optional image_mask [B, N] for "fusion"/"full".
        Returns: last hidden state [B, L, D].
        """
        fusion_layer, num_layers = self.config.fusion_layer, self.config.num_layers
        start, stop = {"text": (0, fusion_layer), "fusion": (fusion_layer, num_layers), "full": (0, num_layers)}[mode]
        if mode == "fusion":
            if hidden is None or input_ids is not None:
                raise ValueError("mode='fusion' takes hidden (the text-mode output), not input_ids")
            x = hidden
        else:
            if input_ids is None or hidden is not None:
                raise ValueError(f"mode={mode!r} takes input_ids, not hidden")
            x = self.embeddings(input_ids)
        mask, img_mask = _key_mask(attention_mask), _key_mask(image_mask)
        for layer in self.encoder.layer[start:stop]:
            x = layer(x, mask, image_embeds, img_mask)
        return x

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> vocabulary logits [..., V] (decoder tied to the word embeddings)."""
        if self.cls is None:
            raise ValueError("this text encoder was built without its MLM head (with_mlm_head=False)")
        head = self.cls.predictions
        return F.linear(head.transform(hidden), self.embeddings.word_embeddings.weight, head.bias)


def build_text_encoder(config: TextConfig, *, with_mlm_head: bool = True) -> TextEncoder:
    return TextEncoder(config, with_mlm_head=with_mlm_head)
