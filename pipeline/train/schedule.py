"""Learning-rate and distillation-weight schedules as pure functions of the optimizer step.

Pure functions (no scheduler object with hidden state) make resume exact by construction: a run
restored at step s computes the same LR as the uninterrupted run did at step s.

Two LR schedules (`optim.schedule`):
- cosine: the paper's pretraining: linear warm-up from `warmup_lr` to `lr` over `warmup_steps`, then
  a cosine to `min_lr` at the run's last step, continuous in the step.
- per_epoch_cosine: the official Retrieval.py (a timm epoch cosine with `warmup_prefix`, stepped once
  per epoch with `epoch + warmup_epochs + 1` after one warm-up epoch whose LR is `warmup_lr` = `lr`):
  epoch 0 at `lr` (after the warm-up, if any), then in epoch e >= 1 the constant
  min_lr + (lr - min_lr) * (1 + cos(pi * e / E)) / 2, E = the run's length in epochs; `min_lr` from
  epoch E on. (The official pretraining steps the same scheduler the same way after a staircase
  warm-up over its first 2,000 iterations; our pretraining configs use the continuous cosine the
  paper describes.)
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "per_epoch_cosine"]


def lr_at(
    step: int,
    *,
    lr: float,
    warmup_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "cosine",
    steps_per_epoch: int = 1,
) -> float:
    """LR used by optimizer step `step` (0-based).

    Linear from `warmup_lr` (step 0) to `lr` (step `warmup_steps`) in both schedules, then
    cosine: from `lr` to `min_lr` at step `total_steps`; constant `min_lr` beyond (an extended run
    never goes below).
    per_epoch_cosine: `lr` for the rest of epoch 0, then constant per epoch e (step // steps_per_epoch)
    at the cosine value of e / (total_steps / steps_per_epoch); `min_lr` once that reaches 1.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    if schedule == "per_epoch_cosine":
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        progress = min(1.0, (step // steps_per_epoch) * steps_per_epoch / max(total_steps, 1))
    elif schedule == "cosine":
        decay_steps = total_steps - warmup_steps
        if decay_steps <= 0:
            return lr
        progress = min(1.0, (step - warmup_steps) / decay_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def alpha_at(step: int, *, alpha: float, ramp_steps: int) -> float:
    """Distillation weight at optimizer step `step`: alpha * min(1, step / ramp_steps).

    As the official code (`alpha * min(1, i / len(loader))` in epoch 0), alpha is 0 at the very
    first step: the momentum model is still random, its pseudo-targets carry no information.
    """
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)
