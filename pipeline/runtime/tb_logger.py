"""TensorBoard writer for rank 0 (a no-op elsewhere), plus the console line.

Scalars are namespaced: `train/*` (losses, LR, alpha, temp, loss scale, grad norm, skipped steps,
ITC accuracy), `perf/*` (images/s global and per GPU, data-wait), `data/*` (bad samples), `val/*`
(per-epoch validation of fine-tuning tasks). The resolved config is written once as text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


class TBLogger:
    """SummaryWriter wrapper; `enabled=False` (ranks > 0) makes every call a no-op."""

    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self.writer: SummaryWriter | None = None
        if enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown: indent by 4 so YAML keeps its layout in TensorBoard's text tab.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def console_line(step: int, total: int, epoch: float, values: Mapping[str, float]) -> str:
    """One human-readable line with the same figures TensorBoard gets."""
    v = dict(values)
    losses = " ".join(
        f"{k.split('/')[-1].removeprefix('loss_')} {v[k]:.4f}"
        for k in sorted(v)
        if k.startswith("train/loss_") and k not in ("train/loss_total", "train/loss_scale")
    )
    parts = [f"step {step}/{total} ep {epoch:.2f}", f"loss {v.get('train/loss_total', float('nan')):.4f} ({losses})"]
    extras = [
        ("itc_acc", "train/itc_acc", ".3f"),
        ("lr", "train/lr", ".2e"),
        ("alpha", "train/alpha", ".3f"),
        ("temp", "train/temp", ".4f"),
        ("scale", "train/loss_scale", ".0f"),
        ("gnorm", "train/grad_norm", ".3f"),
        ("skipped", "train/skipped_steps", ".0f"),
    ]
    parts.append(" ".join(f"{name} {v[key]:{fmt}}" for name, key, fmt in extras if key in v))
    if "perf/images_per_s" in v:
        parts.append(
            f"{v['perf/images_per_s']:.1f} img/s ({v.get('perf/images_per_s_per_gpu', 0.0):.1f}/gpu) wait {100 * v.get('perf/data_wait_frac', 0.0):.0f}%"
        )
    if "data/bad_samples" in v:
        parts.append(f"bad {v['data/bad_samples']:.0f}")
    return " | ".join(parts)
