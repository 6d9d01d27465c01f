"""ALBEF's three losses and the hard-negative sampler, as pure functions computed in fp32.

Whatever dtype the encoders run in, everything here is upcast first: similarities divided by a small
temperature, softmaxes over 65k queue entries or a 30k vocabulary, and multinomial sampling all lose
too much in fp16/bf16 (and the classic zero-after-softmax diagonal gives NaNs there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

__all__ = ["ITCResult", "itc_loss", "sample_hard_negatives", "itm_loss", "mlm_loss"]


F_ = TypeVar("F_", bound=Callable)


def fp32(fn: F_) -> F_:
    """Run `fn` with autocast off (CPU and CUDA): under autocast a plain `a @ b` of fp32 tensors would
    silently run in bf16/fp16 again."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ITCResult(NamedTuple):
    itc_loss: torch.Tensor  # scalar, mean of the image->text and text->image soft cross-entropies
    itc_acc: torch.Tensor  # scalar, share of rows whose top-1 among [batch | queue] is a positive, both directions
    sim_i2t: torch.Tensor  # [B, B + Q] image_feat vs [text_feat_m | text_queue] / temp
    sim_t2i: torch.Tensor  # [B, B + Q] text_feat vs [image_feat_m | image_queue] / temp
    positives: torch.Tensor  # [B, B + Q] bool, True where a column is a positive of the row (same image)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def _positives(
    b: int, q: int, idx: torch.Tensor | None, idx_queue: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """[B, B + Q] bool: the diagonal alone without ids, else every column holding the row's image id."""
    if (idx is None) != (idx_queue is None):
        raise ValueError("pass both idx and idx_queue (image ids of the batch and of the queue) or neither")
    if idx is None or idx_queue is None:
        return torch.eye(b, b + q, dtype=torch.bool, device=device)  # positive of row b is column b
    if idx.shape != (b,) or idx_queue.numel() != q:
        raise ValueError(f"idx {tuple(idx.shape)} / idx_queue {tuple(idx_queue.shape)} do not fit B={b}, Q={q}")
    idx = idx.to(device=device, dtype=torch.long)
    idx_all = torch.cat([idx, idx_queue.reshape(-1).to(device=device, dtype=torch.long)])  # [B + Q]
    return idx[:, None] == idx_all[None, :]  # the diagonal always included


@fp32
def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    idx: torch.Tensor | None = None,
    idx_queue: torch.Tensor | None = None,
) -> ITCResult:
    """Image-text contrastive loss with momentum distillation.

    Args:
        image_feat, text_feat: [B, E] L2-normalised features (with grad).
        image_feat_m, text_feat_m: [B, E] momentum features (no grad).
        image_queue, text_queue: [E, Q] L2-normalised columns (earlier momentum features, all ranks).
        temp: scalar temperature, already clamped.
        alpha: weight of the momentum model's soft targets; targets = alpha*softmax(s_m) + (1-alpha)*pos/pos.sum().
        idx, idx_queue: [B] and [1, Q] image ids of the batch and of the queued columns (retrieval
            fine-tuning, where a COCO image comes back with each of its 5 captions): every column holding
            the row's image id is a positive. Without them the positive of row b is column b alone
            (pos/pos.sum() is then exactly the one-hot diagonal of pretraining).
    """
    b, q = image_feat.shape[0], image_queue.shape[1]
    image_feat, text_feat = image_feat.float(), text_feat.float()
    with torch.no_grad():
        pos = _positives(b, q, idx, idx_queue, image_feat.device)
        pos_targets = pos.float() / pos.sum(dim=1, keepdim=True)
        text_all = torch.cat([text_feat_m.float().t(), text_queue.float()], dim=1)  # [E, B + Q]
        image_all = torch.cat([image_feat_m.float().t(), image_queue.float()], dim=1)
        sim_i2t_m = image_feat_m.float() @ text_all / temp
        sim_t2i_m = text_feat_m.float() @ image_all / temp
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * pos_targets
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * pos_targets
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    loss = (_soft_cross_entropy(sim_i2t, i2t_targets) + _soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    with torch.no_grad():
        hit_i2t = pos.gather(1, sim_i2t.argmax(1, keepdim=True)).float().mean()
        hit_t2i = pos.gather(1, sim_t2i.argmax(1, keepdim=True)).float().mean()
        acc = (hit_i2t + hit_t2i) / 2
    return ITCResult(loss, acc, sim_i2t, sim_t2i, pos)


@fp32
@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per text and per image, drawn in proportion to softmax similarity.

    Args:
        sim_i2t, sim_t2i: [B, >=B] similarities; only the in-batch block [:, :B] is used.
        exclude: [B, B] bool, True = column j is never drawn for row b, in both directions (for text b
            among images and for image b among texts). Default: the diagonal (the positive pair). The
            retrieval model excludes every pair of the same image (`ITCResult.positives[:, :B]`).
    Returns: (neg_image_idx [B]: negative image for text b, neg_text_idx [B]: negative text for image b).

    Excluded entries are set to -inf BEFORE the softmax, so they get exactly zero probability and no 0/0
    can appear; both directions are drawn with one vectorised `torch.multinomial`. A row with every entry
    excluded (a batch holding only its own image) falls back to excluding just the diagonal: a same-image
    "negative" is then possible, but only in such degenerate batches, instead of NaN weights.
    """
    b = sim_i2t.shape[0]
    if b < 2:
        raise ValueError(f"hard-negative sampling needs a batch of at least 2 pairs, got {b}")
    eye = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    if exclude is None:
        exclude = eye
    elif exclude.shape != (b, b):
        raise ValueError(f"exclude must be [B, B] = [{b}, {b}], got {tuple(exclude.shape)}")
    exclude = torch.where(exclude.all(dim=1, keepdim=True), eye, exclude.to(device=eye.device, dtype=torch.bool))
    logits = torch.cat([sim_t2i[:, :b].float(), sim_i2t[:, :b].float()], dim=0).masked_fill(
        exclude.repeat(2, 1), -torch.inf
    )
    weights = F.softmax(logits, dim=1)  # [2B, B]: rows 0..B-1 texts -> images, rows B..2B-1 images -> texts
    draws = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return draws[:b], draws[b:]


@fp32
def itm_loss(logits: torch.Tensor, num_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM cross-entropy over [positives (num_pos), negatives (rest)] logits [3B, 2] -> (loss, accuracy)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_pos] = 1
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(1) == labels).float().mean()
    return loss, acc


@fp32
def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor | None, alpha: float | torch.Tensor
) -> torch.Tensor:
    """MLM loss with momentum distillation on the masked tokens only.

    Args:
        logits: [M, V] logits of the M masked tokens; labels: [M] their original ids.
        logits_m: [M, V] the momentum model's logits (no grad), or None for the plain MLM loss.
    Returns: (1 - alpha) * CE + alpha * soft-CE(softmax over the VOCAB axis of logits_m), averaged over the
        masked tokens; 0 (still attached to the graph) when nothing is masked.
    """
    logits = logits.float()
    count = max(labels.numel(), 1)
    hard = F.cross_entropy(logits, labels, reduction="sum") / count
    if logits_m is None:
        return hard
    soft_targets = F.softmax(logits_m.float(), dim=-1)  # vocabulary axis (the pre-2022 official code had dim bug)
    soft = -(F.log_softmax(logits, dim=-1) * soft_targets).sum() / count
    return (1 - alpha) * hard + alpha * soft
