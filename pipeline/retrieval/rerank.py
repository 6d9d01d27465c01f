"""Retrieval score matrices: unimodal ITC similarities, then ITM re-ranking of every query's top k.

The official `evaluation` loop runs one fusion forward per query (k pairs each): 30k queries x k=256
for COCO, with tiny batches that leave a GPU mostly idle. Here every (query, candidate) pair of a
block of queries is flattened and scored `pairs_per_batch` at a time, so one fusion forward covers
many queries. The scores are those of the one-query loop (`rerank_naive`, kept as the reference
the tests and `bench/eval.py` compare against).

Three score matrices come out (higher = better; pairs not in a query's top k hold -inf):
- "itc": the cosine similarity of the unimodal features, complete (no re-ranking).
- "itm": ITM logit of the "match" class on the top k (the official ALBEF score).
- "itm_itc": ITM logit + cosine similarity on the top k (LAVIS' ALBEF score, usually better).

Distributed: the query rows are split into contiguous blocks, one per rank; each rank re-ranks its
block and the blocks are all-gathered, so every rank ends with the same full matrices and every row
comes from exactly one rank's computation (no reduction arithmetic, an exact merge).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# itm_fn(image_embeds [P, Nv, Dv], text_hidden [P, L, D], text_mask [P, L]) -> logits [P, 2]
ItmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Side = Literal["i2t", "t2i"]
SCORE_NAMES = ("itc", "itm", "itm_itc")
LENGTH_BUCKET = 8  # tokens: captions are padded up to a multiple of this, not to the longest of the split


@dataclass
class EncodedSplit:
    """Every image and caption of an eval split, encoded once (rows in the split's index order)."""

    image_embeds: torch.Tensor  # [N_img, Nv, Dv] ViT tokens (fusion keys/values)
    image_feat: torch.Tensor  # [N_img, E] L2-normalised ITC features
    text_hidden: torch.Tensor  # [N_txt, L, D] text-layer output (fusion input)
    text_mask: torch.Tensor  # [N_txt, L] 1 = token
    text_feat: torch.Tensor  # [N_txt, E] L2-normalised ITC features

    def similarity(self) -> torch.Tensor:
        """Cosine similarity image x caption [N_img, N_txt], fp32 (no temperature: ranking only)."""
        return self.image_feat.float() @ self.text_feat.float().T


@dataclass
class RerankedBlock:
    """Top-k candidates of a block of query rows and their scores."""

    topk_idx: torch.Tensor  # [R, k] candidate indices
    topk_sim: torch.Tensor  # [R, k] fp32 cosine similarities
    itm: torch.Tensor  # [R, k] fp32 ITM match logits


def row_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced [start, end) block of query rows for `rank` (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def _pair_tensors(enc: EncodedSplit, side: Side, q_idx: torch.Tensor, c_idx: torch.Tensor):
    img_idx, txt_idx = (q_idx, c_idx) if side == "i2t" else (c_idx, q_idx)
    return enc.image_embeds[img_idx], enc.text_hidden[txt_idx], enc.text_mask[txt_idx]


@torch.no_grad()
def rerank_block(
    enc: EncodedSplit,
    sims: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    side: Side,
    itm_fn: ItmFn,
    pairs_per_batch: int = 1024,
    trim_padding: bool = True,
) -> RerankedBlock:
    """Re-rank the top k of each query in `rows` with ITM, many queries per fusion forward.

    With `trim_padding`, pairs are grouped by caption length (buckets of LENGTH_BUCKET tokens) and
    each batch is cut to its bucket's length: padded positions are masked keys that never reach
    [CLS], so the padding the official loop carries (every caption padded to 30 tokens) is work
    without effect. The scores then equal the untrimmed ones up to float summation order (~1e-7);
    without it they are bit-identical to `rerank_naive` on the CPU.

    Args:
        sims: [Q_all, C] similarities of every query of this side (rows = queries).
        rows: int64 [R] query indices to process. k: candidates per query (clamped to C).
        pairs_per_batch: (query, candidate) pairs per fusion forward; the memory knob
            (activations ~ pairs x (L + Nv) x width).
    """
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch={pairs_per_batch} must be >= 1")
    k = min(k, sims.shape[1])
    topk_sim, topk_idx = sims[rows].topk(k, dim=1)  # [R, k]
    q_idx = rows.to(topk_idx.device).repeat_interleave(k)  # [R*k], query of each pair
    c_idx = topk_idx.reshape(-1)  # [R*k], candidate of each pair
    width = enc.text_mask.shape[1]
    lengths = enc.text_mask.sum(dim=1).to(topk_idx.device)  # [N_txt] tokens per caption
    # Each pair runs at the length of its bucket (its caption length rounded up to a multiple of
    # LENGTH_BUCKET) whatever else shares the batch: with an itm_fn whose rows do not depend on the
    # batch (the exact path on the CPU), distributed == single process bit for bit.
    pair_len = lengths[q_idx if side == "t2i" else c_idx]
    bucket = (pair_len + LENGTH_BUCKET - 1) // LENGTH_BUCKET * LENGTH_BUCKET
    bucket = bucket.clamp(max=width) if trim_padding else torch.full_like(bucket, width)
    scores = torch.empty(q_idx.numel(), dtype=torch.float32, device=topk_idx.device)
    for n in bucket.unique().tolist():
        members = (bucket == n).nonzero().squeeze(1)
        for start in range(0, members.numel(), pairs_per_batch):
            sel = members[start : start + pairs_per_batch]
            image, text, mask = _pair_tensors(enc, side, q_idx[sel], c_idx[sel])
            scores[sel] = itm_fn(image, text[:, :n], mask[:, :n])[:, 1].float()
    return RerankedBlock(topk_idx, topk_sim.float(), scores.view(-1, k))


@torch.no_grad()
def rerank_naive(enc: EncodedSplit, sims: torch.Tensor, k: int, side: Side, itm_fn: ItmFn) -> RerankedBlock:
    """The official loop: one fusion forward per query on its k candidates (reference, slow)."""
    k = min(k, sims.shape[1])
    idx, sim, itm = [], [], []
    for q in range(sims.shape[0]):
        topk_sim, topk_idx = sims[q].topk(k)
        query = torch.full_like(topk_idx, q)
        logits = itm_fn(*_pair_tensors(enc, side, query, topk_idx))
        idx.append(topk_idx)
        sim.append(topk_sim.float())
        itm.append(logits[:, 1].float())
    return RerankedBlock(torch.stack(idx), torch.stack(sim), torch.stack(itm))


def _all_gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's [counts[r], ...] block in rank order (blocks padded to equal size)."""
    if len(counts) == 1:
        return x
    pad = max(counts)
    padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def gather_block(block: RerankedBlock, num_rows: int, world_size: int) -> RerankedBlock:
    """All ranks' blocks -> the block of all `num_rows` rows (identity in one process)."""
    counts = [e - s for s, e in (row_range(num_rows, r, world_size) for r in range(world_size))]
    return RerankedBlock(*(_all_gather_rows(t, counts) for t in (block.topk_idx, block.topk_sim, block.itm)))


def block_to_matrices(block: RerankedBlock, num_candidates: int) -> dict[str, torch.Tensor]:
    """Scatter a full block into dense [Q, C] "itm" and "itm_itc" matrices, -inf off the top k."""
    out = {}
    for name, values in (("itm", block.itm), ("itm_itc", block.itm + block.topk_sim)):
        m = torch.full((block.topk_idx.shape[0], num_candidates), float("-inf"), device=values.device)
        out[name] = m.scatter_(1, block.topk_idx, values)
    return out


def score_matrices(
    enc: EncodedSplit,
    k: int,
    itm_fn: ItmFn,
    *,
    rank: int = 0,
    world_size: int = 1,
    pairs_per_batch: int = 1024,
    trim_padding: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"itc" | "itm" | "itm_itc": (scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])}, fp32 on CPU.

    With world_size > 1 every rank must call this (collectives); all ranks return the same result.
    """
    sims = enc.similarity()  # [N_img, N_txt]
    out: dict[str, list[torch.Tensor]] = {"itc": [sims.cpu(), sims.T.contiguous().cpu()], "itm": [], "itm_itc": []}
    sides: tuple[tuple[Literal["i2t", "t2i"], torch.Tensor], ...] = (("i2t", sims), ("t2i", sims.T))
    for side, side_sims in sides:
        start, end = row_range(side_sims.shape[0], rank, world_size)
        rows = torch.arange(start, end, device=side_sims.device)
        block = rerank_block(enc, side_sims, rows, k, side, itm_fn, pairs_per_batch, trim_padding)
        full = gather_block(block, side_sims.shape[0], world_size)
        for name, matrix in block_to_matrices(full, side_sims.shape[1]).items():
            out[name].append(matrix.cpu())
        logger.info(
            "re-ranked %s: %d queries x top %d (rows %d-%d on rank %d)",
            side,
            side_sims.shape[0],
            min(k, side_sims.shape[1]),
            start,
            end,
            rank,
        )
    return {name: (pair[0], pair[1]) for name, pair in out.items()}
