"""BERT text + fusion encoder with an MLM head, parameter names compatible with HF BERT.

Why our own layers: transformers' BertLayer only cross-attends as a causal decoder; ALBEF's fusion layers
are bidirectional self-attention -> cross-attention to image tokens -> FFN, all post-LN. The module tree
reproduces HF's names (`embeddings.*`, `encoder.layer.N.attention.self.query`, ..., `cls.predictions.*`)
so `bert-base-uncased` weights load by name; `crossattention.*` (layers >= fusion_layer) are new.

The MLM decoder is tied structurally: logits = h @ word_embeddings.weight.T + cls.predictions.bias, so
there is no separate `decoder.weight` parameter that a state-dict load could untie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TextConfig

__all__ = ["TextEncoder", "PackedTokens", "build_text_encoder", "Mode"]

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

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, N, Dkv] -> (keys, values), each [B, H, N, D/H]."""
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], context [B, N, Dkv], mask bool [B, 1, 1, N] (True = attend) or None.

        kv: `project_kv(context)` computed once by the caller (then `context` is not read): the
        cross-attention keys/values of images shared by several passes or many texts.
        """
        q = self._heads(self.query(x))
        if kv is None:
            if context is None:
                raise ValueError("attention needs a context or precomputed keys/values")
            kv = self.project_kv(context)
        k, v = kv
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

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.output(self.self(x, context, mask, kv), x)


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
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        image_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """image_kv: this layer's `crossattention.self.project_kv(image)`, when the caller shares it."""
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            if image is None and image_kv is None:
                raise ValueError("a fusion layer needs image_embeds to cross-attend to")
            x = self.crossattention(x, image, image_mask, image_kv)
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


@dataclass
class PackedTokens:
    """m variable-length token sequences without padding: row j of a packed [T, D] tensor is token
    `flat_pos[j]` of the padded [m * length] layout (T = number of real tokens).

    Token-wise work (linear layers, LayerNorm, FFN, cross-attention to one shared image) runs on the
    packed rows, so padding costs nothing; only self-attention goes through the padded layout.
    """

    flat_pos: torch.Tensor  # int64 [T] position in the padded [m * length] layout
    first: torch.Tensor  # int64 [m] packed row of each sequence's first token ([CLS])
    key_mask: torch.Tensor  # bool [m, 1, 1, length] (SDPA: True = attend)
    length: int  # padded length

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> PackedTokens:
        """attention_mask [m, L] (1 = token, first token real) -> the packing of its real tokens."""
        mask = attention_mask.bool()
        flat_pos = mask.reshape(-1).nonzero().squeeze(1)
        counts = mask.sum(dim=1)
        first = torch.cumsum(counts, 0) - counts
        return cls(flat_pos, first, mask[:, None, None, :], mask.shape[1])

    @property
    def num_sequences(self) -> int:
        return self.key_mask.shape[0]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed [T, ...] -> padded [m, length, ...] (zeros at padding)."""
        out = x.new_zeros(self.num_sequences * self.length, *x.shape[1:])
        out[self.flat_pos] = x
        return out.view(self.num_sequences, self.length, *x.shape[1:])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Padded [m, length, ...] -> packed [T, ...]."""
        return x.reshape(self.num_sequences * self.length, *x.shape[2:])[self.flat_pos]


def _self_attention_packed(att: BertAttention, x: torch.Tensor, tokens: PackedTokens) -> torch.Tensor:
    """Self-attention sublayer (post-LN) on packed rows x [T, D] -> [T, D]: projections on the packed
    rows, attention through the padded layout (padding keys masked)."""
    s = att.self
    keys, values = s._heads(tokens.pad(s.key(x))), s._heads(tokens.pad(s.value(x)))  # [m, H, L, d]
    q = s._heads(tokens.pad(s.query(x)))  # [m, H, L, d]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=tokens.key_mask)
    m, h, n, d = out.shape
    return att.output(tokens.pack(out.transpose(1, 2).reshape(m, n, h * d)), x)


def _cls_self_attention_absorbed(att: BertAttention, x: torch.Tensor, tokens: PackedTokens) -> torch.Tensor:
    """Self-attention sublayer for the [CLS] queries only, keys/values never projected: packed x [T, D] -> [m, D].

    With one query per sequence, q.(Wk x + bk) = (Wk^T q).x + q.bk and sum_j a_j (Wv x_j + bv) =
    Wv (sum_j a_j x_j) + bv (the weights sum to 1): the key/value projections move from every token
    (2 D^2 each) to once per sequence, leaving 2 H D per token. Same numbers up to summation order.
    """
    s = att.self
    cls = x[tokens.first]  # [m, D]
    m, width = cls.shape
    h = s.num_heads
    d = width // h
    q = s.query(cls).view(m, h, d)
    w_k, w_v = s.key.weight.view(h, d, -1), s.value.weight.view(h, d, -1)  # [H, d, D]
    q_k = torch.einsum("mhd,hdc->mhc", q, w_k)  # [m, H, D]
    q_b = torch.einsum("mhd,hd->mh", q, s.key.bias.view(h, d))  # [m, H]
    padded = tokens.pad(x)  # [m, L, D]
    scores = (torch.bmm(q_k, padded.transpose(1, 2)) + q_b[..., None]) * d**-0.5  # [m, H, L]
    scores = scores.masked_fill(~tokens.key_mask[:, 0], float("-inf"))
    weighted = torch.bmm(scores.softmax(dim=-1), padded)  # [m, H, D]
    out = torch.einsum("mhc,hdc->mhd", weighted, w_v) + s.value.bias.view(h, d)  # [m, H, d]
    return att.output(out.reshape(m, width), cls)


def _cross_attention_one_image(
    att: BertAttention, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-attention sublayer for rows x [R, D] of texts that all attend to ONE image, kv [1, H, N, d].

    With a shared image every row is an independent query of the same keys: the rows fold into one
    [1, H, R, d] query block (no per-text copy of the image's keys/values, one large attention).
    query: `att.self.query(x)` when the caller has it (it does not depend on the image).
    """
    s = att.self
    r, width = x.shape
    query = s.query(x) if query is None else query
    q = query.view(r, s.num_heads, width // s.num_heads).transpose(0, 1)[None]  # [1, H, R, d]
    out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [1, H, R, d]
    return att.output(out[0].transpose(0, 1).reshape(r, width), x)


def bert_weight_init(config: TextConfig) -> Callable[[nn.Module], None]:
    """`module.apply` initialiser: HF BERT's (normal, std config.initializer_range = 0.02) or fan-in
    Linear weights (config.weight_init). It matters only for layers not loaded from a checkpoint."""

    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = config.initializer_range
            if isinstance(module, nn.Linear) and config.weight_init == "fan_in":
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

    return init


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
        self.apply(bert_weight_init(config))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        mode: Mode = "text",
        image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Inputs:
            input_ids [B, L] ("text"/"full") or hidden [B, L, D] ("fusion"); attention_mask [B, L] (1 = token);
            image_embeds [B, N, encoder_width] and optional image_mask [B, N] for "fusion"/"full";
            image_kv: optional `image_kv(image_embeds)` computed once by the caller (one (keys, values) pair
            per fusion layer, each [B, H, N, D/H]); `image_embeds` is then not read.
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
        if image_kv is None:
            for layer in self.encoder.layer[start:stop]:
                x = layer(x, mask, image_embeds, img_mask)
            return x
        for i, layer in enumerate(self.encoder.layer[start:stop], start):
            kv = image_kv[i - fusion_layer] if i >= fusion_layer else None
            x = layer(x, mask, image_embeds, img_mask, kv)
        return x

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention (keys, values) [B, H, N, D/H] of every fusion layer for image tokens [B, N, Dv].

        Keys/values depend on the image only: compute them once and pass `image_kv=` to every pass that
        cross-attends to the same images (gradients flow back through the shared tensors).
        """
        out = []
        for layer in self.encoder.layer[self.config.fusion_layer :]:
            cross = cast(BertLayer, layer).crossattention
            assert cross is not None
            out.append(cross.self.project_kv(image_embeds))
        return out

    def fusion_text_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The image-independent start of the fusion: the first fusion layer's self-attention sublayer.

        hidden [B, L, D] (text-mode output) -> [B, L, D]. In re-ranking it runs once per caption instead of
        once per (image, caption) pair; `fuse_cls_one_image` continues from it.
        """
        layer = cast(BertLayer, self.encoder.layer[self.config.fusion_layer])
        return layer.attention(hidden, hidden, _key_mask(attention_mask))

    def fusion_prefix_query(self, prefix: torch.Tensor) -> torch.Tensor:
        """The first fusion layer's cross-attention queries of `fusion_text_prefix` rows (image-independent)."""
        cross = cast(BertLayer, self.encoder.layer[self.config.fusion_layer]).crossattention
        assert cross is not None
        return cross.self.query(prefix)

    def fuse_cls_one_image(
        self,
        prefix: torch.Tensor,
        tokens: PackedTokens,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rest of the fusion for m captions against ONE image; returns the fused [CLS] rows [m, D].

        prefix: packed [T, D] rows of `fusion_text_prefix` (layout `tokens`); image_kv: `image_kv` of the
        image ([1, H, N, d] per fusion layer, no image mask). Equals `forward(mode="fusion")[:, 0]` up to
        float summation order: the last layer computes its [CLS] row only (its keys/values absorbed into
        the [CLS] query, see `_cls_self_attention_absorbed`), padding is never computed.
        prefix_query: `fusion_prefix_query(prefix)` rows, when the caller computed them once per caption.
        """
        layers = [cast(BertLayer, m) for m in self.encoder.layer[self.config.fusion_layer :]]
        x = prefix
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            query = prefix_query if i == 0 else None
            if i > 0:
                if last:
                    x = _cls_self_attention_absorbed(layer.attention, x, tokens)
                else:
                    x = _self_attention_packed(layer.attention, x, tokens)
            elif last:
                x = x[tokens.first]
                query = None if prefix_query is None else prefix_query[tokens.first]
            assert layer.crossattention is not None
            x = _cross_attention_one_image(layer.crossattention, x, image_kv[i], query)
            x = layer.output(layer.intermediate(x), x)
        return x

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> vocabulary logits [..., V] (decoder tied to the word embeddings)."""
        if self.cls is None:
            raise ValueError("this text encoder was built without its MLM head (with_mlm_head=False)")
        head = self.cls.predictions
        return F.linear(head.transform(hidden), self.embeddings.word_embeddings.weight, head.bias)


def build_text_encoder(config: TextConfig, *, with_mlm_head: bool = True) -> TextEncoder:
    return TextEncoder(config, with_mlm_head=with_mlm_head)
