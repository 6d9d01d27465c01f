"""ALBEF for image-text retrieval fine-tuning: ITC (momentum distillation, queues with image ids) + ITM.

`ALBEFRetrieval` is an `ALBEFBase` (model/albef.py) with, as the official `models/model_retrieval.py`:
  - `idx_queue` [1, Q] holding the image id of every queued feature (EMPTY_IDX = empty). ITC targets
    treat every entry sharing the query's image id as a positive: targets = pos / pos.sum(), because a
    COCO image has 5 captions and the same image comes back in the batch and the queue;
  - ITM hard negatives that exclude every pair of the same image, not just the diagonal;
  - no MLM head: loss = ITC + ITM. The text encoder keeps its 6 text + 6 fusion layers.
ITC and the sampler are the pretraining ones (model/losses.py) given the ids. Parameter names are the
pretraining model's, so its checkpoints load directly, and so do the official fine-tuned ones.
Like `ALBEF.forward`, `forward` mutates nothing; the trainer calls `momentum_update()` once per
optimizer step before the forward and `enqueue(**out.queue_update())` (all-gathered) after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from model.albef import ALBEFBase
from model.config import ALBEFConfig
from model.convert import ConversionReport, from_official
from model.text import TextEncoder, build_text_encoder
from model.vision import VisionEncoder, build_vision_encoder

__all__ = [
    "ALBEFRetrieval",
    "RetrievalOutput",
    "build_retrieval",
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

    def metrics(self) -> dict[str, torch.Tensor]:
        """Non-loss scalars worth logging."""
        return {"itc_acc": self.itc_acc, "itm_acc": self.itm_acc, "temp": self.temp}

    def queue_update(self) -> dict[str, torch.Tensor]:
        """Exactly the keyword arguments of `ALBEFRetrieval.enqueue` (per rank: all-gather each first)."""
        return {"image_feat_m": self.image_feat_m, "text_feat_m": self.text_feat_m, "idx": self.idx}


class ALBEFRetrieval(ALBEFBase):
    """Inputs: image [B, 3, H, W], input_ids / attention_mask [B, L], idx [B] int64 image ids."""

    idx_queue: torch.Tensor  # [1, Q] int64 image id of every queued feature, EMPTY_IDX = none yet

    def __init__(self, config: ALBEFConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder) -> None:
        if text_encoder.cls is not None:
            raise ValueError("the retrieval model takes a text encoder without MLM head (see build_retrieval)")
        super().__init__(config, visual_encoder, text_encoder)
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), EMPTY_IDX, dtype=torch.long))

    @torch.no_grad()
    def reset_queues(self, seed: int | None = None) -> None:
        """Random unit-norm feature queues (see `ALBEFBase.reset_queues`) and an empty id queue."""
        super().reset_queues(seed)
        self.idx_queue.fill_(EMPTY_IDX)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor) -> None:
        """Write all-gathered momentum features [N, E] and their image ids [N] at the pointer."""
        if idx.shape[0] != image_feat_m.shape[0]:
            raise ValueError(f"{idx.shape[0]} image ids for {image_feat_m.shape[0]} features")
        ptr = self._write_queues(image_feat_m, text_feat_m)  # validates sizes, advances the pointer
        self.idx_queue[0, ptr : ptr + idx.shape[0]] = idx.to(self.idx_queue.dtype)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor,
        alpha: float | torch.Tensor,
        *,
        neg_image_idx: torch.Tensor | None = None,
        neg_text_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RetrievalOutput:
        """ITC + ITM of one batch; `neg_*_idx` replay given hard negatives instead of sampling."""
        idx = idx.to(device=self.idx_queue.device, dtype=torch.long)
        cm = self._contrast_and_match(
            image,
            input_ids,
            attention_mask,
            alpha,
            idx=idx,
            idx_queue=self.idx_queue,
            neg_image_idx=neg_image_idx,
            neg_text_idx=neg_text_idx,
            generator=generator,
        )
        return RetrievalOutput(
            itc_loss=cm.itc.itc_loss,
            itm_loss=cm.itm_loss,
            image_feat_m=cm.image_feat_m,
            text_feat_m=cm.text_feat_m,
            idx=idx,
            itc_acc=cm.itc.itc_acc,
            itm_acc=cm.itm_acc,
            temp=cm.temp,
            neg_image_idx=cm.neg_image_idx,
            neg_text_idx=cm.neg_text_idx,
        )


def build_retrieval(config: ALBEFConfig) -> ALBEFRetrieval:
    """Random-init retrieval model (load weights with `load_retrieval_state`)."""
    # no MLM head: unused by retrieval, and absent from fine-tuned checkpoints
    text_encoder = build_text_encoder(config.text, with_mlm_head=False)
    model = ALBEFRetrieval(config, build_vision_encoder(config.vision), text_encoder)
    logger.info(
        "built ALBEF retrieval model: %.1fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6
    )
    return model


def retrieval_state_dict(
    state_dict: dict[str, Any], config: ALBEFConfig
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
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


def load_retrieval_state(model: ALBEFRetrieval, state_dict: dict[str, Any]) -> ConversionReport:
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
