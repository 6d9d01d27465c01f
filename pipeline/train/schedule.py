"""Learning-rate and distillation-weight schedules as pure functions of the optimizer step.

Pure functions (no scheduler object with hidden state) make resume exact by construction: a run
restored at step s computes the same LR as the uninterrupted run did at step s.

The paper warms up linearly from 1e-5 to 1e-4 over ~2000 iterations, then decays with a cosine to
1e-5 over 30 epochs. (The official code steps a timm epoch-level cosine whose epoch counter is
offset by the 20 warm-up "epochs", so its LR after epoch 0 is already partly decayed; we follow
the schedule the paper describes, continuous in the step.)
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR used by optimizer step `step` (0-based).

    Linear from `warmup_lr` (step 0) to `lr` (step `warmup_steps`), then cosine from `lr` to
    `min_lr` at step `total_steps`; constant `min_lr` beyond (an extended run never goes below).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def alpha_at(step: int, *, alpha: float, ramp_steps: int) -> float:
    """Distillation weight at optimizer step `step`: alpha * min(1, step / ramp_steps).

    As the official code (`alpha * min(1, i / len(loader))` in epoch 0), alpha is 0 at the very
    first step: the momentum model is still random, its pseudo-targets carry no information.
    """
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)
