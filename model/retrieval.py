"""ALBEF for image-text retrieval fine-tuning: ITC (momentum distillation, queues with image ids) + ITM.

It is the pretraining `ALBEF` with three differences (official `models/model_retrieval.py`):
  - `idx_queue` [1, Q] holds the image id of every queued feature (-100 = empty). ITC targets treat
    every entry sharing the query's image id as a positive: targets = pos / pos.sum(), because a COCO
    image has 5 captions and the same image comes back in the batch and the queue;
  - ITM hard negatives exclude every pair of the same image, not just the diagonal;
  - no MLM head: loss = ITC + ITM. The text encoder keeps its 6 text + 6 fusion layers.
Everything else (encoders, momentum twins in fp32, EMA, queue handling, `encode_*`, `itm_logits`) is
inherited, so the parameter names are the pretraining model's and its checkpoints load directly.
Like `ALBEF.forward`, `forward` mutates nothing; the trainer calls `momentum_update()` once per
optimizer step before the forward and `enqueue(feat_m, feat_m, idx)` with all-gathered tensors after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.albef import ALBEF
from model.config import ALBEFConfig
from model.convert import ConversionReport, from_official
from model.losses import ITCResult
from model.text import TextEncoder, build_text_encoder
from model.vision import build_vision_encoder

__all__ = [
    "ALBEFRetrieval",
    "RetrievalOutput",
    "build_retrieval",
    "itc_loss_with_ids",
    "sample_hard_negatives_by_id",
    "retrieval_state_dict",
    "load_retrieval_state",
    "EMPTY_IDX",
]

logger = logging.getLogger(__name__)

EMPTY_IDX = -100  # idx_queue value of a slot that holds no fine-tuning feature yet (official constant)
_MLM_PREFIXES = ("text_encoder.cls.", "text_encoder_m.cls.")
_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")


@dataclass
class RetrievalOutput:
    """One fine-tuning forward. Loss terms end in `_loss` (fp32 scalars); total = their sum (`.loss`)."""

    itc_loss: torch.Tensor
    itm_loss: torch.Tensor
    image_feat_m: torch.Tensor  # [B, E] fp32 momentum features, to all-gather and enqueue
    text_feat_m: torch.Tensor  # [B, E]
    idx: torch.Tensor  # [B] int64 image ids of the batch, to all-gather and enqueue
    itc_acc: torch.Tensor  # scalar: top-1 of [batch | queue] is a positive (same image), both directions
    itm_acc: torch.Tensor  # scalar over the 3B ITM pairs
    temp: torch.Tensor  # scalar, the clamped temperature used
    neg_image_idx: torch.Tensor  # [B] negative image drawn for text b
    neg_text_idx: torch.Tensor  # [B] negative text drawn for image b

    @property
    def loss(self) -> torch.Tensor:
        return self.itc_loss + self.itm_loss

    def losses(self) -> dict[str, torch.Tensor]:
        return {"itc_loss": self.itc_loss, "itm_loss": self.itm_loss}


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss_with_ids(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    idx: torch.Tensor,
    idx_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float | torch.Tensor,
) -> ITCResult:
    """ITC where every column with the query's image id is a positive (all fp32).

    Args:
        image_feat, text_feat: [B, E] unit features (grad); image_feat_m, text_feat_m: [B, E] (no grad).
        image_queue, text_queue: [E, Q]; idx: [B] image ids; idx_queue: [1, Q] ids of the queued columns.
        alpha: targets = alpha * softmax(momentum similarities) + (1 - alpha) * pos / pos.sum().
    Returns: ITCResult with sim_i2t / sim_t2i [B, B + Q] (batch columns first, as in pretraining).
    """
    image_feat, text_feat = image_feat.float(), text_feat.float()
    with torch.no_grad():
        idx_all = torch.cat([idx.view(1, -1), idx_queue.view(1, -1).to(idx.dtype)], dim=1)  # [1, B + Q]
        pos = (idx.view(-1, 1) == idx_all).float()  # [B, B + Q], the diagonal always included
        id_targets = pos / pos.sum(dim=1, keepdim=True)
        text_all = torch.cat([text_feat_m.float().t(), text_queue.float()], dim=1)  # [E, B + Q]
        image_all = torch.cat([image_feat_m.float().t(), image_queue.float()], dim=1)
        i2t_targets = alpha * F.softmax(image_feat_m.float() @ text_all / temp, dim=1) + (1 - alpha) * id_targets
        t2i_targets = alpha * F.softmax(text_feat_m.float() @ image_all / temp, dim=1) + (1 - alpha) * id_targets
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    loss = (_soft_cross_entropy(sim_i2t, i2t_targets) + _soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    with torch.no_grad():
        rows = torch.arange(pos.shape[0], device=pos.device)
        acc = (pos[rows, sim_i2t.argmax(1)].mean() + pos[rows, sim_t2i.argmax(1)].mean()) / 2
    return ITCResult(loss, acc, sim_i2t, sim_t2i)


@torch.no_grad()
def sample_hard_negatives_by_id(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per text and per image, never of the same image id (softmax-weighted draw).

    Same-image entries are set to -inf BEFORE the softmax (exact zeros, no 0/0 in low precision).
    A row whose batch holds only its own image (every entry masked) falls back to excluding just the
    diagonal: a sampled same-image "negative" is then possible but only in such degenerate batches.
    Returns (neg_image_idx [B] for each text, neg_text_idx [B] for each image).
    """
    b = sim_i2t.shape[0]
    if b < 2:
        raise ValueError(f"hard-negative sampling needs a batch of at least 2 pairs, got {b}")
    same = idx.view(-1, 1) == idx.view(1, -1)  # [B, B]
    eye = torch.eye(b, dtype=torch.bool, device=same.device)
    lonely = same.all(dim=1, keepdim=True)  # rows with no other image in the batch
    mask = torch.where(lonely, eye, same).repeat(2, 1)
    logits = torch.cat([sim_t2i[:, :b].float(), sim_i2t[:, :b].float()], dim=0).masked_fill(mask, -torch.inf)
    draws = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return draws[:b], draws[b:]


class ALBEFRetrieval(ALBEF):
    """Inputs: image [B, 3, H, W], input_ids / attention_mask [B, L], idx [B] int64 image ids."""

    def __init__(self, config: ALBEFConfig, visual_encoder, text_encoder: TextEncoder) -> None:
        if getattr(text_encoder, "cls", None) is not None:
            raise ValueError("the retrieval model takes a text encoder without MLM head (see build_retrieval)")
        super().__init__(config, visual_encoder, text_encoder)
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), EMPTY_IDX, dtype=torch.long))

    @torch.no_grad()
    def reset_queues(self, seed: int | None = None) -> None:
        super().reset_queues(seed)
        if hasattr(self, "idx_queue"):  # absent while ALBEF.__init__ runs
            self.idx_queue.fill_(EMPTY_IDX)

    @torch.no_grad()
    def enqueue(
        self,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,  # type: ignore[override]
        idx: torch.Tensor,
    ) -> None:
        """Write all-gathered momentum features [N, E] and their image ids [N] at the pointer."""
        if idx.shape[0] != image_feat_m.shape[0]:
            raise ValueError(f"{idx.shape[0]} image ids for {image_feat_m.shape[0]} features")
        ptr = int(self.queue_ptr)
        super().enqueue(image_feat_m, text_feat_m)  # validates sizes, advances the pointer
        self.idx_queue[0, ptr : ptr + idx.shape[0]] = idx.to(self.idx_queue.dtype)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,  # type: ignore[override]
        idx: torch.Tensor,
        alpha: float | torch.Tensor,
        *,
        neg_image_idx: torch.Tensor | None = None,
        neg_text_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RetrievalOutput:
        """ITC + ITM of one batch; `neg_*_idx` replay given hard negatives instead of sampling."""
        temp = self.clamped_temp()
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        _, image_feat_m = self.encode_image_m(image)
        _, text_feat_m = self.encode_text_m(input_ids, attention_mask)
        idx = idx.to(device=image_feat.device, dtype=torch.long)
        itc = itc_loss_with_ids(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            self.image_queue,
            self.text_queue,
            idx,
            self.idx_queue,
            temp,
            alpha,
        )
        if neg_image_idx is None or neg_text_idx is None:
            sampled = sample_hard_negatives_by_id(itc.sim_i2t, itc.sim_t2i, idx, generator)
            neg_image_idx = sampled[0] if neg_image_idx is None else neg_image_idx
            neg_text_idx = sampled[1] if neg_text_idx is None else neg_text_idx
        itm, itm_acc = self._itm(image_embeds, text_embeds, attention_mask, neg_image_idx, neg_text_idx)
        return RetrievalOutput(
            itc_loss=itc.itc_loss,
            itm_loss=itm,
            image_feat_m=image_feat_m,
            text_feat_m=text_feat_m,
            idx=idx,
            itc_acc=itc.itc_acc,
            itm_acc=itm_acc,
            temp=temp.detach(),
            neg_image_idx=neg_image_idx,
            neg_text_idx=neg_text_idx,
        )

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
        layer, cls = layers[last], x[:, :1]
        h = layer.attention.output(layer.attention.self(cls, x, keys), cls)  # [CLS] queries, all tokens as keys
        if layer.crossattention is not None:
            h = layer.crossattention(h, image_embeds, img_keys)
        h = layer.output(layer.intermediate(h), h)
        return self.itm_head(h[:, 0, :]).float()

    def mlm_logits(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError("the retrieval model has no MLM head")


def build_retrieval(config: ALBEFConfig) -> ALBEFRetrieval:
    """Random-init retrieval model (load weights with `load_retrieval_state`)."""
    text_encoder = build_text_encoder(config.text)
    text_encoder.cls = None  # MLM head: unused by retrieval, and absent from fine-tuned checkpoints
    model = ALBEFRetrieval(config, build_vision_encoder(config.vision), text_encoder)
    logger.info(
        "built ALBEF retrieval model: %.1fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6
    )
    return model


def retrieval_state_dict(state_dict: dict, config: ALBEFConfig) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Any ALBEF checkpoint -> retrieval-model keys (pure): ours (pretrain or retrieval), official
    pretrain (`text_encoder.bert.*`) or official fine-tuned (`text_encoder.*`, `idx_queue`).

    Position embeddings are resampled to `config`'s resolution; the MLM head is dropped (skipped);
    `idx_queue` is kept when the queues load (same size), else every queue is re-initialised.
    Raises ValueError for keys the model does not know or shape mismatches.
    """
    sd = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    sd = {k: v for k, v in sd.items()}
    idx_queue = sd.pop("idx_queue", None)
    out, report = from_official(sd, config, strict=True)
    for key in [k for k in out if k.startswith(_MLM_PREFIXES)]:
        del out[key]
        report.skipped[key] = "MLM head: unused by retrieval"
    report.mapped = [(src, ours) for src, ours in report.mapped if not ours.startswith(_MLM_PREFIXES)]
    report.missing = [k for k in report.missing if not k.startswith(_MLM_PREFIXES)]
    queues_loaded = all(k in out for k in _QUEUE_KEYS)
    if idx_queue is not None and queues_loaded and tuple(idx_queue.shape) == (1, config.queue_size):
        out["idx_queue"] = idx_queue.long()
        report.mapped.append(("idx_queue", "idx_queue"))
    else:
        if idx_queue is not None:
            report.skipped["idx_queue"] = "queues not loaded (size differs); re-initialised empty"
        report.missing.append("idx_queue")
    return out, report


def load_retrieval_state(model: ALBEFRetrieval, state_dict: dict) -> ConversionReport:
    """Load any ALBEF checkpoint dict into `model`; only queues (re-initialised) may be missing.

    A pretraining checkpoint has no `idx_queue` (it starts empty) and queues of another size are
    re-initialised; anything else missing raises (the classic silent-partial-load failure).
    """
    out, report = retrieval_state_dict(state_dict, model.config)
    result = model.load_state_dict(out, strict=False)
    allowed = {"idx_queue"} | set(_QUEUE_KEYS)
    missing = sorted(set(result.missing_keys) - allowed)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not fit the retrieval model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    reinit = sorted(set(result.missing_keys) & allowed)
    if set(_QUEUE_KEYS) & set(reinit):
        model.reset_queues()
    elif "idx_queue" in reinit:
        model.idx_queue.fill_(EMPTY_IDX)
    logger.info("retrieval weights loaded (%s); re-initialised: %s", report.summary(), reinit or "nothing")
    return report
