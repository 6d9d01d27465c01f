"""Recall@K for image-text retrieval, computed from score matrices (pure functions, no model).

Conventions (the official ALBEF `itm_eval`, made deterministic):
- `scores_i2t` [N_img, N_txt]: row = an image query, columns = every caption of the split.
  `scores_t2i` [N_txt, N_img]: row = a caption query, columns = every image.
- `img2txt[i]`: the caption indices of image i (>= 1 each); `txt2img[t]`: the image of caption t.
- Text retrieval (image query) counts the BEST rank among the image's captions: its rank is the
  number of non-positive captions ranked above the first positive one. Image retrieval (caption
  query) has one positive, its image.
- Ties are broken pessimistically: a negative scoring EQUAL to the best positive counts as ranked
  above it. The official code sorts with numpy's unstable argsort, so its tie order is arbitrary;
  pessimistic ties make the numbers reproducible and give a constant-score model zero recall
  instead of a perfect one. Entries that the re-ranker did not score hold -inf and so tie with
  each other: a positive left outside the top k is never counted as a hit by accident.
- With fewer candidates than K, recall@K is 100% (every candidate is within the first K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_ROW_CHUNK = 1024  # rows per step: bounds the [chunk, N] temporaries on 5k x 25k matrices


def positive_mask_from_txt2img(txt2img: Sequence[int] | torch.Tensor, num_images: int) -> torch.Tensor:
    """Bool [N_txt, N_img]: caption t's positive is image txt2img[t]."""
    index = torch.as_tensor(txt2img, dtype=torch.long)
    if index.ndim != 1:
        raise ValueError(f"txt2img must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() and (index.min() < 0 or index.max() >= num_images):
        raise ValueError(f"txt2img holds image indices outside [0, {num_images})")
    mask = torch.zeros(index.numel(), num_images, dtype=torch.bool)
    mask[torch.arange(index.numel()), index] = True
    return mask


def positive_mask_from_img2txt(img2txt: Sequence[Sequence[int]], num_texts: int) -> torch.Tensor:
    """Bool [N_img, N_txt]: image i's positives are its captions img2txt[i] (at least one each)."""
    mask = torch.zeros(len(img2txt), num_texts, dtype=torch.bool)
    for i, captions in enumerate(img2txt):
        idx = torch.as_tensor(list(captions), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError(f"image {i} has no captions in img2txt")
        if idx.min() < 0 or idx.max() >= num_texts:
            raise ValueError(f"img2txt[{i}] holds caption indices outside [0, {num_texts})")
        mask[i, idx] = True
    return mask


def ranks_from_scores(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best positive of every query row (see the module docstring for ties).

    Args:
        scores: float [Q, C], higher = better; -inf allowed (unscored), NaN is an error.
        positives: bool [Q, C], at least one True per row.
    Returns:
        int64 [Q]: number of non-positive candidates scoring >= the row's best positive.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal 2-D shapes"
        )
    if torch.isnan(scores).any():
        raise ValueError("score matrix contains NaN")
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive candidate")
    ranks = []
    for start in range(0, scores.shape[0], _ROW_CHUNK):
        s = scores[start : start + _ROW_CHUNK].float()
        pos = positives[start : start + _ROW_CHUNK].to(s.device)
        best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # [q, 1]
        ranks.append(((s >= best) & ~pos).sum(dim=1).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Percentage of queries whose rank is < K, for each K."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def query_ranks(
    scores: tuple[torch.Tensor, torch.Tensor], img2txt: Sequence[Sequence[int]], txt2img: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each image query's best caption [N_img], rank of each caption query's image [N_txt]).

    Every metric of a ranking (recall@K, recall curves, paired differences) derives from these, so an
    evaluation ranks each score matrix once.

    Args:
        scores: (scores_i2t [N_img, N_txt] image-query scores, scores_t2i [N_txt, N_img] caption-query scores).
        img2txt: caption indices of each image. txt2img: image index of each caption.
    """
    scores_i2t, scores_t2i = scores
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, expected {(n_txt, n_img)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"index maps cover {len(img2txt)} images / {len(txt2img)} captions, scores {n_img} / {n_txt}")
    pos_t2i = positive_mask_from_txt2img(txt2img, n_img)
    pos_i2t = positive_mask_from_img2txt(img2txt, n_txt)
    if not torch.equal(pos_i2t, pos_t2i.T):
        raise ValueError("img2txt and txt2img disagree about which caption belongs to which image")
    return ranks_from_scores(scores_i2t, pos_i2t), ranks_from_scores(scores_t2i, pos_t2i)


def metrics_from_ranks(ranks: tuple[torch.Tensor, torch.Tensor], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """txt_r{K}, img_r{K}, txt_r_mean, img_r_mean, r_mean in percent (the official key names) of `query_ranks`."""
    curves = recall_curves(ranks, ks)
    txt, img = curves["txt"], curves["img"]
    out: dict[str, float] = {}
    out.update({f"txt_r{k}": v for k, v in txt.items()})
    out.update({f"img_r{k}": v for k, v in img.items()})
    out["txt_r_mean"] = sum(txt.values()) / len(txt)
    out["img_r_mean"] = sum(img.values()) / len(img)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_metrics(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """`metrics_from_ranks` of one pair of score matrices (see `query_ranks` for the arguments)."""
    return metrics_from_ranks(query_ranks((scores_i2t, scores_t2i), img2txt, txt2img), ks)


def recall_curves(ranks: tuple[torch.Tensor, torch.Tensor], ks: Sequence[int]) -> dict[str, dict[int, float]]:
    """{"txt": {K: recall %}, "img": {K: recall %}} of `query_ranks`, for any list of K (the recall@K plot)."""
    return {"txt": recall_at_k(ranks[0], ks), "img": recall_at_k(ranks[1], ks)}


def paired_r1_difference(
    ranks: tuple[torch.Tensor, torch.Tensor], baseline: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """R@1 of one ranking minus R@1 of `baseline` on the same queries, with its standard error (percent).

    Why paired: whether re-ranking helps is a difference between two rankings of the same queries, and
    most queries keep their top-1. The per-query change d in {-1, 0, +1} carries that, so its standard
    error (std(d) / sqrt(n)) is far smaller than two independent recalls' and honest about a split of
    a few hundred images, where a single run's sign is often noise.

    Args:
        ranks, baseline: `query_ranks` of the two rankings (text-retrieval ranks, image-retrieval ranks).
    Returns:
        {"txt_r1" | "img_r1": {"diff", "se", "gained", "lost"}, "r1_mean": {"diff", "se"}}: gained / lost
        count the queries whose top-1 became / stopped being right; r1_mean averages the two sides (its
        standard error treats them as independent samples).
    """
    out: dict[str, dict[str, float]] = {}
    for side, new, base in (("txt_r1", ranks[0], baseline[0]), ("img_r1", ranks[1], baseline[1])):
        d = (new < 1).float() - (base < 1).float()
        se = d.std().item() / math.sqrt(d.numel()) if d.numel() > 1 else float("nan")  # std with n - 1
        out[side] = {
            "diff": 100.0 * d.mean().item(),
            "se": 100.0 * se,
            "gained": int((d > 0).sum().item()),
            "lost": int((d < 0).sum().item()),
        }
    txt, img = out["txt_r1"], out["img_r1"]
    out["r1_mean"] = {"diff": (txt["diff"] + img["diff"]) / 2, "se": math.hypot(txt["se"], img["se"]) / 2}
    return out


def chance_metrics(
    img2txt: Sequence[Sequence[int]], num_texts: int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Expected recall of a random ranking, same keys as `retrieval_metrics` (the baseline to beat).

    Image retrieval: K / N_img. Text retrieval for an image with p positives among N captions:
    1 - C(N-p, K) / C(N, K) (probability that a random K-subset holds a positive), averaged.
    """
    n_img = len(img2txt)
    out: dict[str, float] = {}
    for k in ks:
        total = 0.0
        for captions in img2txt:
            p, miss = len(captions), 1.0
            for j in range(min(k, num_texts)):
                miss *= max(0.0, (num_texts - p - j) / (num_texts - j))
            total += 1.0 - miss
        out[f"txt_r{k}"] = 100.0 * total / n_img
    for k in ks:
        out[f"img_r{k}"] = 100.0 * min(k, n_img) / n_img
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
