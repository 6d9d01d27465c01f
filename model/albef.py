"""ALBEF (Li et al. 2021): the parts every task shares, and the pretraining model (ITC with momentum
queues, ITM with hard negatives, MLM with momentum distillation).

`ALBEFBase` holds what pretraining and retrieval fine-tuning share: encoders, projections, ITM head,
temperature, momentum twins, feature queues, the `encode_*`/`itm_logits*` methods and the ITC + ITM
part of the forward. `ALBEF` (here) adds the MLM head and loss; `ALBEFRetrieval` (model/retrieval.py)
adds the queue of image ids. Both keep the official parameter names, so checkpoints load directly.

Contract with the trainer (see DESIGN.md section 3-4):
  - `forward` computes the losses and does NOT mutate state (no EMA, no queue write, no in-place
    temp clamp), so it is safe on accumulation micro-steps and in eval;
  - `momentum_update()` once per optimizer step, BEFORE the forward (the official order);
  - `enqueue(**{k: all_gather_no_grad(v) for k, v in out.queue_update().items()})` after every forward.
Precision: momentum twins and queues are fp32 (see model/momentum.py); features, similarities, softmaxes,
losses and sampling are fp32 whatever dtype the trained weights are cast to.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ALBEFConfig
from model.losses import ITCResult, itc_loss, itm_loss, mlm_loss, sample_hard_negatives
from model.momentum import copy_into_, ema_pairs, ema_update_, make_momentum_twin
from model.text import BertLayer, PackedTokens, TextEncoder, build_text_encoder
from model.vision import VisionEncoder, build_vision_encoder

__all__ = ["ALBEFBase", "ALBEF", "PretrainOutput", "build_albef"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMP_MIN, TEMP_MAX = 0.001, 0.5
# (trained module, momentum twin): the four modules the official code keeps EMA copies of
MOMENTUM_PAIRS = (
    ("visual_encoder", "visual_encoder_m"),
    ("vision_proj", "vision_proj_m"),
    ("text_encoder", "text_encoder_m"),
    ("text_proj", "text_proj_m"),
)
QUEUES = ("image_queue", "text_queue")

_Model = TypeVar("_Model", bound="ALBEFBase")


@dataclass
class PretrainOutput:
    """One pretraining forward. Loss terms end in `_loss` (fp32 scalars); total = their sum (`.loss`)."""

    itc_loss: torch.Tensor
    itm_loss: torch.Tensor
    mlm_loss: torch.Tensor
    image_feat_m: torch.Tensor  # [B, embed_dim] fp32 momentum features, to all-gather and enqueue
    text_feat_m: torch.Tensor  # [B, embed_dim]
    itc_acc: torch.Tensor  # scalar, positives' top-1 among [batch | queue], mean of both directions
    itm_acc: torch.Tensor  # scalar, over the 3B ITM pairs
    temp: torch.Tensor  # scalar, the clamped temperature used
    neg_image_idx: torch.Tensor  # [B] negative image drawn for text b
    neg_text_idx: torch.Tensor  # [B] negative text drawn for image b

    @property
    def loss(self) -> torch.Tensor:
        return self.itc_loss + self.itm_loss + self.mlm_loss

    def losses(self) -> dict[str, torch.Tensor]:
        return {"itc_loss": self.itc_loss, "itm_loss": self.itm_loss, "mlm_loss": self.mlm_loss}

    def metrics(self) -> dict[str, torch.Tensor]:
        """Non-loss scalars worth logging."""
        return {"itc_acc": self.itc_acc, "itm_acc": self.itm_acc, "temp": self.temp}

    def queue_update(self) -> dict[str, torch.Tensor]:
        """Exactly the keyword arguments of `ALBEF.enqueue` (per rank: all-gather each before the call)."""
        return {"image_feat_m": self.image_feat_m, "text_feat_m": self.text_feat_m}


class ContrastMatch(NamedTuple):
    """ITC + ITM of one batch: what the pretraining and the retrieval forward share."""

    temp: torch.Tensor  # scalar, clamped, fp32
    image_embeds: torch.Tensor  # [B, 1 + P, Dv]
    image_embeds_m: torch.Tensor  # [B, 1 + P, Dv] momentum image tokens (the MLM distillation reads them)
    image_feat_m: torch.Tensor  # [B, E]
    text_feat_m: torch.Tensor  # [B, E]
    itc: ITCResult
    itm_loss: torch.Tensor
    itm_acc: torch.Tensor
    neg_image_idx: torch.Tensor  # [B]
    neg_text_idx: torch.Tensor  # [B]
    image_kv: list[tuple[torch.Tensor, torch.Tensor]]  # cross-attention (keys, values) of image_embeds per fusion layer


def _keep_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a Module._apply function so fp32 tensors follow device moves but never dtype casts."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out

    return apply


class ALBEFBase(nn.Module):
    """Encoders, heads, momentum twins and feature queues; ITC + ITM. Subclasses add the task's forward
    and `enqueue` (whose keyword arguments are their output's `queue_update()`).

    Inputs everywhere: image [B, 3, H, W] (normalised), input_ids / attention_mask [B, L] (1 = token).
    """

    # registered in __init__ by setattr / register_buffer; declared for the type checker
    visual_encoder_m: VisionEncoder
    vision_proj_m: nn.Linear
    text_encoder_m: TextEncoder
    text_proj_m: nn.Linear
    image_queue: torch.Tensor  # [E, Q] fp32, unit-norm columns
    text_queue: torch.Tensor  # [E, Q]
    queue_ptr: torch.Tensor  # [1] int64, next column to write

    def __init__(self, config: ALBEFConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        if visual_encoder.embed_dim != config.vision.width:
            raise ValueError(f"visual encoder width {visual_encoder.embed_dim} != config.vision.width")
        if text_encoder.config != config.text:
            raise ValueError("text encoder was built from a different TextConfig than config.text")
        self.config = config
        text_width = config.text.hidden_size
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.ones([]) * config.temp)
        for name, twin_name in MOMENTUM_PAIRS:
            setattr(self, twin_name, make_momentum_twin(getattr(self, name)))
        self.register_buffer("image_queue", torch.empty(config.embed_dim, config.queue_size))
        self.register_buffer("text_queue", torch.empty(config.embed_dim, config.queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._reset_feature_queues(None)  # not the overridable `reset_queues`: subclass buffers do not exist yet
        self.train()

    # -- state management (explicit trainer steps) --------------------------------------------------------
    @torch.no_grad()
    def _reset_feature_queues(self, seed: int | None) -> None:
        gen = torch.Generator().manual_seed(self.config.queue_seed if seed is None else seed)
        for name in QUEUES:
            queue = torch.randn(self.config.embed_dim, self.config.queue_size, generator=gen, device="cpu")
            getattr(self, name).copy_(F.normalize(queue, dim=0))
        self.queue_ptr.zero_()

    @torch.no_grad()
    def reset_queues(self, seed: int | None = None) -> None:
        """Random unit-norm queues from a rank-independent seed (DeepSpeed does not broadcast buffers)."""
        self._reset_feature_queues(seed)

    def _ema_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        twins: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, twin_name in MOMENTUM_PAIRS:
            t, s = ema_pairs(getattr(self, name), getattr(self, twin_name))
            twins += t
            sources += s
        return twins, sources

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA theta_m <- m * theta_m + (1 - m) * theta in fp32; once per optimizer step, before the forward."""
        ema_update_(*self._ema_lists(), self.config.momentum)

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum twins <- trained weights (after loading new encoder weights into a fresh model)."""
        copy_into_(*self._ema_lists())

    @torch.no_grad()
    def _write_queues(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> int:
        """Write all-gathered momentum features [N, E] at the pointer, advance it; -> where they went."""
        n = image_feat_m.shape[0]
        if text_feat_m.shape[0] != n:
            raise ValueError(f"image ({n}) and text ({text_feat_m.shape[0]}) feature counts differ")
        if self.config.queue_size % n != 0:
            raise ValueError(
                f"queue_size={self.config.queue_size} must be a multiple of the gathered batch "
                f"(per-rank batch * world size = {n}); change queue_size or the batch size"
            )
        ptr = int(self.queue_ptr)
        if ptr + n > self.config.queue_size:  # only when the gathered batch size changed between calls
            raise ValueError(
                f"enqueue of {n} features at pointer {ptr} overruns queue_size={self.config.queue_size}: "
                "keep the per-rank batch constant (drop the last partial batch)"
            )
        self.image_queue[:, ptr : ptr + n] = image_feat_m.t().to(self.image_queue.dtype)
        self.text_queue[:, ptr : ptr + n] = text_feat_m.t().to(self.text_queue.dtype)
        self.queue_ptr[0] = (ptr + n) % self.config.queue_size
        return ptr

    def momentum_twins(self) -> list[nn.Module]:
        return [getattr(self, twin_name) for _, twin_name in MOMENTUM_PAIRS]

    def train(self: _Model, mode: bool = True) -> _Model:
        super().train(mode)
        if not self.config.momentum_dropout:
            for twin in self.momentum_twins():
                twin.eval()
        return self

    def _apply(self: _Model, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _Model:
        """Momentum twins and queues follow device moves but stay fp32 under `.half()`/`.to(dtype)`."""
        keep = _keep_fp32(fn)
        if recurse:
            twins = {twin_name for _, twin_name in MOMENTUM_PAIRS}
            for name, child in self.named_children():
                child._apply(keep if name in twins else fn)
        queues = {name: self._buffers[name] for name in QUEUES}
        super()._apply(fn, recurse=False)
        for name, queue in queues.items():
            if queue is not None:
                self._buffers[name] = keep(queue)
        return self

    # -- encoders ---------------------------------------------------------------------------------------
    def clamped_temp(self) -> torch.Tensor:
        """fp32 temperature clamped functionally (an in-place clamp is undone by fp16 master weights)."""
        return self.temp.float().clamp(TEMP_MIN, TEMP_MAX)

    @staticmethod
    def _dtype(module: nn.Module) -> torch.dtype:
        tensors = itertools.chain(module.parameters(), module.buffers())  # twins hold buffers only
        return next(t for t in tensors if t.is_floating_point()).dtype

    def _image(self, encoder: nn.Module, proj: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = encoder(image.to(self._dtype(encoder)))
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def _text(
        self, encoder: TextEncoder, proj: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = encoder(input_ids, attention_mask, mode="text")
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_embeds [B, 1 + P, Dv] incl. CLS, image_feat [B, E] fp32 unit-norm)."""
        return self._image(self.visual_encoder, self.vision_proj, image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_embeds [B, L, D] from the text layers, text_feat [B, E] fp32 unit-norm)."""
        return self._text(self.text_encoder, self.text_proj, input_ids, attention_mask)

    @torch.no_grad()
    def encode_image_m(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum-encoder version of `encode_image` (fp32 weights; under autocast, autocast's dtype)."""
        return self._image(self.visual_encoder_m, self.vision_proj_m, image)

    @torch.no_grad()
    def encode_text_m(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._text(self.text_encoder_m, self.text_proj_m, input_ids, attention_mask)

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        *,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Fusion layers on text-mode hidden states, cross-attending to image tokens -> [B, L, D].

        image_kv: `text_encoder.image_kv(image_embeds)` when the caller already has it (then
        image_embeds may be None)."""
        return self.text_encoder(
            attention_mask=attention_mask,
            hidden=text_embeds,
            image_embeds=image_embeds,
            image_mask=image_mask,
            mode="fusion",
            image_kv=image_kv,
        )

    def itm_logits(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        *,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Image-text matching logits [B, 2] (fp32; column 1 = match) of aligned pairs."""
        fused = self.fuse(text_embeds, attention_mask, image_embeds, image_mask, image_kv=image_kv)
        return self.itm_head(fused[:, 0, :]).float()

    # -- re-ranking against one image at a time (pipeline/retrieval/rerank.py) ------------------------------
    def itm_text_prefix(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, D]: the image-independent first step of `fuse` (once per caption, not per pair)."""
        return self.text_encoder.fusion_text_prefix(text_embeds, attention_mask)

    def itm_image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention (keys, values) of every fusion layer for image tokens [B, N, Dv] (once per image)."""
        return self.text_encoder.image_kv(image_embeds)

    def itm_prefix_query(self, prefix: torch.Tensor) -> torch.Tensor:
        """First fusion layer's cross-attention queries of `itm_text_prefix` rows (once per caption)."""
        return self.text_encoder.fusion_prefix_query(prefix)

    def itm_logits_one_image(
        self,
        prefix: torch.Tensor,
        tokens: PackedTokens,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits [m, 2] (fp32) of m captions against one image: `itm_logits_cls` from cached parts.

        prefix: packed rows [T, D] of `itm_text_prefix` (layout `tokens`); image_kv: `itm_image_kv` of the
        image ([1, H, N, d] per fusion layer); prefix_query: `itm_prefix_query(prefix)` rows (optional).
        Same numbers as `itm_logits` up to float summation order.
        """
        fused = self.text_encoder.fuse_cls_one_image(prefix, tokens, image_kv, prefix_query)
        return self.itm_head(fused).float()

    def itm_logits_cls(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`itm_logits` [B, 2] (fp32) with the last fusion layer computed for the [CLS] query only.

        ITM reads one row, [CLS], of the last layer; its other rows only feed that layer's keys and
        values. Skipping their queries, cross-attention and FFN removes most of the last layer's work
        (~40% of a 2-layer fusion, ~15% of ALBEF-base's 6) with the same result per row.
        """
        layers = self.text_encoder.encoder.layer
        start, last = self.config.text.fusion_layer, len(layers) - 1
        keys = attention_mask.bool()[:, None, None, :]  # SDPA: True = attend
        img_keys = None if image_mask is None else image_mask.bool()[:, None, None, :]
        x = text_embeds
        for layer in layers[start:last]:
            x = layer(x, keys, image_embeds, img_keys)
        layer, cls = cast(BertLayer, layers[last]), x[:, :1]
        h = layer.attention.output(layer.attention.self(cls, x, keys), cls)  # [CLS] queries, all tokens as keys
        if layer.crossattention is not None:
            h = layer.crossattention(h, image_embeds, img_keys)
        h = layer.output(layer.intermediate(h), h)
        return self.itm_head(h[:, 0, :]).float()

    # -- ITC + ITM, shared by the task forwards -----------------------------------------------------------
    def _contrast_and_match(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float | torch.Tensor,
        *,
        idx: torch.Tensor | None,
        idx_queue: torch.Tensor | None,
        neg_image_idx: torch.Tensor | None,
        neg_text_idx: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> ContrastMatch:
        """ITC (positives: the diagonal, or every pair sharing an image id when `idx` is given) and ITM on
        [positives | hard negatives]; the negatives never share the image. Given `neg_*_idx` are replayed
        instead of sampled (with `generator`, if given)."""
        temp = self.clamped_temp()
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        # The image side of every cross-attention of this step (ITM positives, text negatives, MLM):
        # projected once per fusion layer; gradients of all passes meet in these tensors.
        image_kv = self.text_encoder.image_kv(image_embeds)
        image_embeds_m, image_feat_m = self.encode_image_m(image)
        _, text_feat_m = self.encode_text_m(input_ids, attention_mask)
        itc = itc_loss(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            self.image_queue,
            self.text_queue,
            temp,
            alpha,
            idx=idx,
            idx_queue=idx_queue,
        )
        if neg_image_idx is None or neg_text_idx is None:
            b = image_feat.shape[0]
            sims = (itc.sim_i2t, itc.sim_t2i)
            kind = self.config.itm_negatives
            if kind != "hard":  # zeroed rows = equal weights: uniform over the allowed in-batch items
                hard_rows = torch.zeros(2, b, 1, dtype=torch.bool, device=itc.sim_i2t.device)
                if kind == "mixed":  # same device as the draws below (and as `generator`, if given)
                    hard_rows = torch.rand(2, b, 1, generator=generator, device=itc.sim_i2t.device) < 0.5
                sims = (itc.sim_i2t * hard_rows[0], itc.sim_t2i * hard_rows[1])
            sampled = sample_hard_negatives(*sims, exclude=itc.positives[:, :b], generator=generator)
            neg_image_idx = sampled[0] if neg_image_idx is None else neg_image_idx
            neg_text_idx = sampled[1] if neg_text_idx is None else neg_text_idx
        itm, itm_acc = self._itm(image_kv, text_embeds, attention_mask, neg_image_idx, neg_text_idx)
        return ContrastMatch(
            temp.detach(),
            image_embeds,
            image_embeds_m,
            image_feat_m,
            text_feat_m,
            itc,
            itm,
            itm_acc,
            neg_image_idx,
            neg_text_idx,
            image_kv,
        )

    def _itm(
        self,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        neg_image_idx: torch.Tensor,
        neg_text_idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fusion pass over 3B pairs: [(text b, image b)], [(text b, image neg_image_idx[b])],
        [(text neg_text_idx[b], image b)]; labels [1]*B + [0]*2B.

        image_kv: the batch's cross-attention (keys, values) per fusion layer ([B, H, N, d]); the pairs'
        keys/values are gathered from them (rows of a projection = projection of the rows)."""
        b = text_embeds.shape[0]
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text_idx]], dim=0)  # [3B, L, D]
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text_idx]], dim=0)
        kv_all = [
            (torch.cat([k, k[neg_image_idx], k], dim=0), torch.cat([v, v[neg_image_idx], v], dim=0))  # [3B, H, N, d]
            for k, v in image_kv
        ]
        return itm_loss(self.itm_logits(text_all, mask_all, None, image_kv=kv_all), num_pos=b)


class ALBEF(ALBEFBase):
    """The pretraining model: ITC + ITM + MLM. The text encoder must carry its MLM head."""

    def __init__(self, config: ALBEFConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder) -> None:
        if text_encoder.cls is None:
            raise ValueError("the pretraining model needs a text encoder with its MLM head (build_text_encoder)")
        super().__init__(config, visual_encoder, text_encoder)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Write all-gathered momentum features [N, E] (N = batch * world, rank order) at the pointer."""
        self._write_queues(image_feat_m, text_feat_m)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_input_ids: torch.Tensor,
        mlm_labels: torch.Tensor,
        alpha: float | torch.Tensor,
        *,
        neg_image_idx: torch.Tensor | None = None,
        neg_text_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        """Three ALBEF losses for one batch.

        Inputs:
            image [B, 3, H, W]; input_ids, attention_mask [B, L]; mlm_input_ids [B, L] (masked copy of
            input_ids, see model/masking.py), mlm_labels [B, L] (-100 = not masked); alpha: distillation
            weight (the trainer ramps it). neg_image_idx / neg_text_idx [B]: replay given hard negatives
            instead of sampling them (with `generator`, if given).
        """
        cm = self._contrast_and_match(
            image,
            input_ids,
            attention_mask,
            alpha,
            idx=None,
            idx_queue=None,
            neg_image_idx=neg_image_idx,
            neg_text_idx=neg_text_idx,
            generator=generator,
        )
        mlm = self._mlm(mlm_input_ids, attention_mask, mlm_labels, cm.image_kv, cm.image_embeds_m, alpha)
        return PretrainOutput(
            itc_loss=cm.itc.itc_loss,
            itm_loss=cm.itm_loss,
            mlm_loss=mlm,
            image_feat_m=cm.image_feat_m,
            text_feat_m=cm.text_feat_m,
            itc_acc=cm.itc.itc_acc,
            itm_acc=cm.itm_acc,
            temp=cm.temp,
            neg_image_idx=cm.neg_image_idx,
            neg_text_idx=cm.neg_text_idx,
        )

    def _mlm(
        self,
        mlm_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_labels: torch.Tensor,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        image_embeds_m: torch.Tensor,
        alpha: float | torch.Tensor,
    ) -> torch.Tensor:
        """MLM + distillation; the vocabulary projection runs on the masked tokens only (~15%).
        image_kv: the step's shared cross-attention keys/values of the trained image tokens."""
        selected = mlm_labels != IGNORE_INDEX  # [B, L]
        hidden = self.text_encoder(mlm_input_ids, attention_mask, mode="full", image_kv=image_kv)
        logits = self.text_encoder.mlm_head(hidden[selected])  # [M, V]
        with torch.no_grad():
            twin = self.text_encoder_m
            hidden_m = twin(
                mlm_input_ids, attention_mask, image_embeds=image_embeds_m.to(self._dtype(twin)), mode="full"
            )
            logits_m = twin.mlm_head(hidden_m[selected])
        return mlm_loss(logits, mlm_labels[selected], logits_m, alpha)


def build_albef(config: ALBEFConfig) -> ALBEF:
    """Assemble the pretraining model from a config (random init; load weights with pipeline/weights/init.py)."""
    model = ALBEF(config, build_vision_encoder(config.vision), build_text_encoder(config.text))
    n_train = sum(p.numel() for p in model.parameters())
    logger.info("built ALBEF: %.1fM trainable parameters", n_train / 1e6)
    return model
