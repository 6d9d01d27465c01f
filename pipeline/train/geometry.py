"""The training geometry: every count derived from the config, the world size and the data, once.

The trainer, the DeepSpeed dict and the start-up checks read one `TrainGeometry`; nothing else
recomputes a global batch or an epoch length, so they can never disagree. It is logged once at
start as a small table and stored in every checkpoint's client state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import OptimConfig, TrainConfig, check

SEGMENT_CAP = 1000  # micro-batches a preemption resume may have to re-decode per rank, at most


@dataclass(frozen=True)
class TrainGeometry:
    """Batch and step counts of one run (units in the field comments)."""

    world_size: int  # ranks
    micro_batch: int  # images per rank per micro-step
    grad_accum_steps: int  # micro-steps per optimizer step
    global_batch: int  # images per optimizer step, all ranks
    gathered_batch: int  # features enqueued per micro-step (micro_batch x world_size)
    samples_per_epoch: int  # samples per epoch, in `epoch_unit`
    steps_per_epoch: int  # optimizer steps per epoch (full global batches only)
    total_steps: int  # optimizer steps of the run = the LR schedule's length
    warmup_steps: int  # optimizer steps of LR warm-up
    alpha_ramp_steps: int  # optimizer steps over which alpha rises from 0
    save_every_steps: int  # optimizer steps between checkpoints
    segment_steps: int  # data-stream segment, in micro-steps (a resume restarts at a segment start)
    queue_size: int | None  # ITC queue columns (None: the task has no queue)
    schedule_from: str = "train.epochs"  # what set total_steps: "train.max_steps" or "train.epochs"
    lr_schedule: str = "cosine"  # optim.schedule
    epoch_unit: str = "samples"  # what an epoch counts ("image-caption pairs" for ALBEF)
    source_shares: tuple[tuple[str, float], ...] = ()  # (source name, share of the samples), the data mix

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A few aligned lines for the start-up log."""
        rows = [
            ("world size", f"{self.world_size}"),
            ("batch / rank / micro-step", f"{self.micro_batch}"),
            ("accumulation", f"{self.grad_accum_steps}"),
            ("global batch", f"{self.global_batch}"),
            ("epoch", f"{self.samples_per_epoch:,} {self.epoch_unit}"),
            *[(f"  share of {name}", f"{share:.1%}") for name, share in self.source_shares],
            ("steps / epoch", f"{self.steps_per_epoch:,}"),
            ("total steps", f"{self.total_steps:,} ({self.total_steps / self.steps_per_epoch:.2f} epochs)"),
            ("lr schedule", f"{self.lr_schedule} over {self.total_steps:,} steps (length set by {self.schedule_from})"),
            ("warm-up steps", f"{self.warmup_steps:,}"),
            ("alpha ramp steps", f"{self.alpha_ramp_steps:,}"),
            ("checkpoint every", f"{self.save_every_steps:,} steps"),
            ("stream segment", f"{self.segment_steps:,} micro-steps"),
        ]
        if self.queue_size is not None:
            rows.append(
                ("queue", f"{self.queue_size:,} = {self.queue_size // self.gathered_batch} x {self.gathered_batch}")
            )
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def derive_geometry(
    train: TrainConfig,
    optim: OptimConfig,
    *,
    world_size: int,
    samples_per_epoch: int,
    queue_size: int | None = None,
    epoch_unit: str = "samples",
    source_shares: Sequence[tuple[str, float]] = (),
) -> TrainGeometry:
    """All counts of a run; ConfigError (naming the key) when the data or the queue cannot fit.

    `train.max_steps`, when set, is the run's length AND the LR schedule's (the cosine reaches
    optim.min_lr at max_steps); otherwise train.epochs x steps per epoch. `schedule_from` says which.
    """
    gathered = train.batch_size * world_size
    global_batch = gathered * train.grad_accum_steps
    if queue_size is not None:
        check(
            queue_size % gathered == 0,
            "model.queue_size",
            f"{queue_size} is not a multiple of the gathered micro-batch train.batch_size x world size "
            f"= {train.batch_size} x {world_size} = {gathered} (each micro-step enqueues that many features)",
        )
    steps_per_epoch = samples_per_epoch // global_batch
    check(
        steps_per_epoch >= 1,
        "train.batch_size",
        f"{samples_per_epoch} samples per epoch are fewer than one global batch of {global_batch} "
        f"(train.batch_size {train.batch_size} x train.grad_accum_steps {train.grad_accum_steps} x {world_size} ranks)",
    )
    total = train.max_steps if train.max_steps is not None else train.epochs * steps_per_epoch
    return TrainGeometry(
        world_size=world_size,
        micro_batch=train.batch_size,
        grad_accum_steps=train.grad_accum_steps,
        global_batch=global_batch,
        gathered_batch=gathered,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=optim.warmup_steps,
        alpha_ramp_steps=round(train.alpha_ramp_epochs * steps_per_epoch),
        save_every_steps=train.save_every_steps,
        segment_steps=segment_steps_for(train.save_every_steps, train.grad_accum_steps),
        queue_size=queue_size,
        schedule_from="train.max_steps" if train.max_steps is not None else "train.epochs",
        lr_schedule=optim.schedule,
        epoch_unit=epoch_unit,
        source_shares=tuple((str(name), float(share)) for name, share in source_shares),
    )


def segment_steps_for(save_every_steps: int, grad_accum_steps: int, cap: int = SEGMENT_CAP) -> int:
    """Data-stream segment length in micro-steps: a divisor of the checkpoint interval, so a
    checkpoint-boundary resume needs no fast-forward, capped so that a preemption resume
    re-decodes at most `cap` micro-batches per rank (split over the loader workers)."""
    interval = save_every_steps * grad_accum_steps
    if interval <= cap:
        return interval
    return max(d for d in range(1, cap + 1) if interval % d == 0)
