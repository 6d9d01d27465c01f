"""The one ALBEF training task: what pretraining and retrieval fine-tuning have in common.

Both train an ALBEF model whose momentum encoders follow the trained ones (EMA once per optimizer
step, before the forward, as the official code) and whose ITC queues receive the all-gathered
momentum features of every micro-batch (the trainer does it from `StepOutput.queue_update`).
They differ only in the model they build, the batch -> model inputs, and what an epoch counts;
a stage subclasses `AlbefTask` with those three and nothing else.

The downstream-task models (model/heads: SNLI-VE, NLVR2, VQA) follow the same contract without
queues: a `momentum_update()` (their distillation teacher) and an output with `losses()`,
`metrics()` and `loss`, but no `queue_update()`; such a task returns None from `queue_size`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from model.albef import ALBEFBase
from model.config import ALBEFConfig
from model.heads.base import TaskModel
from pipeline.config import build_model_config
from pipeline.data import Source, build_train_loader, load_sources
from pipeline.data.manifest import source_shares
from pipeline.data.text import build_tokenizer
from pipeline.data.transforms import normalize_images
from pipeline.train.task import StepContext, StepOutput, TrainTask


class AlbefTask(TrainTask):
    """EMA before each optimizer step, losses and metrics from the model output, queue update after backward."""

    finetune: bool = False  # train crop scale: (0.2, 1) pretraining, (0.5, 1) fine-tuning
    # What `samples_per_epoch` sums over the manifests: image-caption pairs (num_captions) as the official
    # code's per-caption json for pretraining and fine-tuning alike, or images (num_samples).
    epoch_counts: Literal["images", "captions"] = "captions"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.data.vocab)
        self._sources: list[Source] | None = None

    # -- what a stage provides -------------------------------------------------------------------------
    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward for one batch (alpha is added by `forward`)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------
    def model_config(self) -> ALBEFConfig:
        return build_model_config(self.cfg.model, seed=self.cfg.train.seed)

    def sources(self) -> list[Source]:
        """The training manifests, read once (OSError/ValueError for a missing or bad one)."""
        if self._sources is None:
            self._sources = load_sources(self.cfg.data.train, self.cfg.data.weights)
        return self._sources

    def samples_per_epoch(self) -> int:
        counted = sum(s.num_captions if self.epoch_counts == "captions" else s.num_samples for s in self.sources())
        return self.cfg.data.samples_per_epoch or counted

    def epoch_unit(self) -> str:
        return "image-caption pairs" if self.epoch_counts == "captions" else "images"

    def source_shares(self) -> list[tuple[str, float]]:
        return [(s.name, share) for s, share in zip(self.sources(), source_shares(self.sources()))]

    def queue_size(self) -> int | None:
        return self.cfg.model.queue_size

    def train_batches(self, *, start_micro_step: int, segment_steps: int, rank: int, world_size: int) -> Iterable[dict]:
        d, t = self.cfg.data, self.cfg.train
        return build_train_loader(
            d.train,
            batch_size=t.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=d.num_workers,
            seed=t.seed,
            start_step=start_micro_step,
            image_res=self.cfg.model.image_res,
            tokenizer=self.tokenizer,
            max_len=d.max_tokens,
            weights=d.weights,
            segment_steps=segment_steps,
            shuffle_buffer=d.shuffle_buffer,
            max_words=d.max_words,
            finetune=self.finetune,
            max_consecutive_bad=d.max_consecutive_bad_samples,
            normalize=False,  # uint8 batches: a quarter of the bytes to collate, pin and copy (batch_tensors)
        )

    def begin_step(self, model: nn.Module, ctx: StepContext) -> None:
        assert isinstance(model, (ALBEFBase, TaskModel)), type(model)
        model.momentum_update()  # once per optimizer step, before the forward (official order)

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        # The global RNG was seeded by the trainer for this (step, micro-step, rank): masking,
        # dropout and hard-negative sampling replay exactly on resume.
        inputs = self.model_inputs(batch, ctx.device)
        out = engine(**inputs, alpha=ctx.alpha)
        scalars: dict[str, torch.Tensor | float] = {
            f"loss_{name.removesuffix('_loss')}": value for name, value in out.losses().items()
        }
        scalars.update(out.metrics())
        queue_update = out.queue_update() if hasattr(out, "queue_update") else None  # task models have no queue
        return StepOutput(
            loss=out.loss, scalars=scalars, num_samples=int(inputs["image"].shape[0]), queue_update=queue_update
        )

    def export_extra(self) -> dict[str, Any]:
        return {"model_config": self.model_config().to_dict()}


def batch_tensors(batch: dict, device: torch.device, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a loader batch on `device` (non-blocking from pinned memory).

    uint8 image batches ([B, 3, H, W], or [B, 2, 3, H, W] for image pairs; the training loaders'
    `normalize=False`) are CLIP-normalised after the copy: the workers skip a float pass and the
    host-to-device copy is 4x smaller."""
    out = {}
    for name in names:
        t = batch[name].to(device, non_blocking=True)
        is_images = t.dtype == torch.uint8 and t.ndim >= 4 and t.shape[-3] == 3
        out[name] = normalize_images(t) if is_images else t
    return out
