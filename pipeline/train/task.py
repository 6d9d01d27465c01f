"""What a training stage plugs into the one `Trainer`: the task interface.

The Trainer owns everything stage-independent: DeepSpeed set-up (weight-decay groups of trainable
parameters, fp32 buffers protected from the engine's cast), the training geometry, the LR and
alpha schedules, gradient accumulation, per-step seeding, the queue update after backward,
checkpoints/resume, preemption, non-finite/overflow handling, TensorBoard and the console. A task
owns what differs between pretraining and fine-tuning:

    build_model()          the nn.Module (seeded by the trainer; identical on every rank)
    samples_per_epoch()    what an epoch counts (sizes epochs, the alpha ramp, validation cadence)
    epoch_unit(), source_shares()  its unit and the data mix, for the logged geometry table
    queue_size()           ITC queue columns, checked against the gathered batch (None: no queue)
    train_batches(...)     the per-rank micro-batch stream, a pure function of (seed, micro-step)
    begin_step(...)        once per optimizer step before the first forward (ALBEF: the EMA)
    forward(...)           one micro-batch -> StepOutput(loss, scalars, num_samples, queue_update)
    validate(...)          at every epoch end; metrics logged as val/*; with `best_metric`
                           (higher is better) the trainer keeps the best checkpoint as tag `best`

After each micro-batch's backward the trainer all-gathers `StepOutput.queue_update` (no grad, rank
order) and calls `model.enqueue(**gathered)`. ALBEF pretraining and retrieval fine-tuning share one
implementation, `AlbefTask` (pipeline/train/albef_task.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.train.geometry import TrainGeometry


@dataclass
class StepContext:
    """Where the trainer is when it calls the task."""

    step: int  # optimizer step being computed (0-based; equals the number of steps already done)
    micro_step: int  # index inside gradient accumulation, 0..grad_accum_steps-1
    epoch: int  # step // steps_per_epoch
    alpha: float  # distillation weight at this step (the trainer's ramp)
    geometry: TrainGeometry  # batch and step counts of the run
    device: torch.device
    rank: int
    world_size: int


@dataclass
class StepOutput:
    """One micro-batch's result. `scalars` are logged as `train/<name>` (means over micro-steps and
    ranks, e.g. loss_itc, itc_acc, temp); the trainer adds loss_total and alpha itself."""

    loss: torch.Tensor  # fp32 scalar to backpropagate
    scalars: dict[str, torch.Tensor | float] = field(default_factory=dict)
    num_samples: int = 0  # images in this micro-batch on this rank
    queue_update: dict[str, torch.Tensor] | None = (
        None  # keyword args of model.enqueue, per rank (gathered by the trainer)
    )


class TrainTask:
    """Base class with the optional hooks as no-ops; see the module docstring."""

    name: str = "task"
    best_metric: str | None = None  # validation metric (higher is better) selecting the `best` tag

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        raise NotImplementedError

    def epoch_unit(self) -> str:
        """What `samples_per_epoch` counts (the geometry table's wording)."""
        return "samples"

    def source_shares(self) -> list[tuple[str, float]]:
        """(source name, share of the training samples) of the data mix, for the geometry table; [] = none."""
        return []

    def queue_size(self) -> int | None:
        """Columns of the model's feature queue (must be a multiple of the gathered batch); None = none."""
        return None

    def train_batches(self, *, start_micro_step: int, segment_steps: int, rank: int, world_size: int) -> Iterable[dict]:
        """Micro-batches for micro-steps start_micro_step, start_micro_step+1, ... (endless or long
        enough). Restarting at any micro-step must reproduce the uninterrupted stream; stream
        segments of `segment_steps` micro-steps start at checkpoint boundaries (a free resume)."""
        raise NotImplementedError

    def begin_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Before the optimizer step's first forward; `model` is the unwrapped module."""

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        """Run the model (call `engine(...)`, the DeepSpeed wrapper) on one micro-batch."""
        raise NotImplementedError

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Per-epoch validation (collective: every rank calls it). {} = none."""
        return {}

    def bad_samples(self, batch: dict) -> dict[str, int]:
        """Skipped-sample counts carried by a batch (increments), by reason."""
        counts = batch.get("bad_samples") if isinstance(batch, dict) else None
        return dict(counts) if counts else {}

    def export_extra(self) -> dict[str, Any]:
        """Extra entries stored in exported files / client state (e.g. the model config)."""
        return {}
