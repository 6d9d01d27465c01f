"""Retrieval score matrices: unimodal ITC similarities, then ITM re-ranking of every query's top k.

The official `evaluation` loop runs one fusion forward per query (k pairs each): 30k queries x k=256
for COCO, with tiny batches that leave a GPU mostly idle. Here every (query, candidate) pair of a
block of queries is flattened and scored `pairs_per_batch` at a time, so one fusion forward covers
many queries. The scores are those of the one-query loop (`rerank_naive`, kept as the reference
the tests and `bench/eval.py` compare against).

Four score matrices come out (higher = better; pairs not in a query's top k hold -inf):
- "itc": the cosine similarity of the unimodal features, complete (no re-ranking).
- "itm": ITM logit of the "match" class on the top k (the official ALBEF score).
- "itm_itc": ITM logit + cosine similarity on the top k (LAVIS' ALBEF score).
- "itm_itc_logit": ITM log-odds (match minus no-match logit) + ITC logit (cosine / temperature) on the
  top k: each model's evidence on the scale it was trained with. In "itm_itc" the cosine hardly counts:
  within a query's top k cosines differ by hundredths (std 0.005-0.05 in the tiny runs of issue 11) and
  ITM logits by tenths, so ITM alone reorders ITC's shortlist and whatever it knows less well than ITC is
  lost. Divided by the temperature (~0.05), ITC's differences weigh as much as ITM's, and ITM refines ITC
  instead of replacing it. Tiny recipe, 5 seeds: R@1 above ITC alone on all, where "itm_itc" was within
  noise of it (pipeline/configs/pretrain_tiny_cpu.yaml). Tiny retrieval fine-tuning, 3 seeds (the setting of
  tests/pipeline/stages/test_finetune_retrieval.py): +2.6 to +6.5 R@1 points over ITC, where "itm" falls
  3.7 to 16.7 below it and "itm_itc" lands at -9.6 to +4.2.

Two ways to run the ITM forwards:
- `score_matrices` (`exact`): pairs flattened per side and scored by an `itm_fn` on whole padded
  batches; with `model.itm_logits` and no length trimming, the official loop's arithmetic bit for bit.
- `score_matrices_grouped` (default): the pairs of BOTH sides are merged (a pair that both
  directions need is scored once) and grouped by image. Per fusion layer each image's
  cross-attention keys/values are projected once and all its captions run against them as one
  folded query block; the image-independent start of the fusion (the first fusion layer's
  self-attention) runs once per caption; captions are packed without padding; the last layer
  computes [CLS] only. Same scores up to float summation order (tests: <= 1e-5 in fp32).

Distributed: each rank scores a contiguous share of the work (query rows per side, or whole
images balanced by pair count) and the shares are all-gathered, so every rank ends with the same
full matrices and every score comes from exactly one rank's computation (no reduction arithmetic,
an exact merge). The grouped path chunks each image's captions the same way whatever the world
size, so its scores do not depend on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from model.text import PackedTokens

logger = logging.getLogger(__name__)

# itm_fn(image_embeds [P, Nv, Dv], text_hidden [P, L, D], text_mask [P, L]) -> logits [P, 2]
ItmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Side = Literal["i2t", "t2i"]
SCORE_NAMES = ("itc", "itm", "itm_itc", "itm_itc_logit")
LENGTH_BUCKET = 8  # tokens: captions are padded up to a multiple of this, not to the longest of the split


class GroupedItmModel(Protocol):
    """What `score_matrices_grouped` needs of the model (ALBEFBase provides it)."""

    def itm_text_prefix(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def itm_prefix_query(self, prefix: torch.Tensor) -> torch.Tensor: ...

    def itm_image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def itm_logits_one_image(
        self,
        prefix: torch.Tensor,
        tokens: PackedTokens,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_query: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass
class EncodedSplit:
    """Every image and caption of an eval split, encoded once (rows in the split's index order)."""

    image_embeds: torch.Tensor  # [N_img, Nv, Dv] ViT tokens (fusion keys/values)
    image_feat: torch.Tensor  # [N_img, E] L2-normalised ITC features
    text_hidden: torch.Tensor  # [N_txt, L, D] text-layer output (fusion input)
    text_mask: torch.Tensor  # [N_txt, L] 1 = token
    text_feat: torch.Tensor  # [N_txt, E] L2-normalised ITC features
    temp: float  # the model's ITC temperature: similarity / temp is the ITC logit ("itm_itc_logit")

    def similarity(self) -> torch.Tensor:
        """Cosine similarity image x caption [N_img, N_txt], fp32 (no temperature: ranking only)."""
        return self.image_feat.float() @ self.text_feat.float().T


@dataclass
class RerankedBlock:
    """Top-k candidates of a block of query rows and their scores."""

    topk_idx: torch.Tensor  # [R, k] candidate indices
    topk_sim: torch.Tensor  # [R, k] fp32 cosine similarities
    logits: torch.Tensor  # [R, k, 2] fp32 ITM logits (column 1 = match)

    @property
    def itm(self) -> torch.Tensor:
        """[R, k] ITM match logits."""
        return self.logits[..., 1]

    @property
    def itm_logodds(self) -> torch.Tensor:
        """[R, k] ITM match minus no-match logit."""
        return self.logits[..., 1] - self.logits[..., 0]


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
    logits = torch.empty(q_idx.numel(), 2, dtype=torch.float32, device=topk_idx.device)
    for n in bucket.unique().tolist():
        members = (bucket == n).nonzero().squeeze(1)
        for start in range(0, members.numel(), pairs_per_batch):
            sel = members[start : start + pairs_per_batch]
            image, text, mask = _pair_tensors(enc, side, q_idx[sel], c_idx[sel])
            logits[sel] = itm_fn(image, text[:, :n], mask[:, :n]).float()
    return RerankedBlock(topk_idx, topk_sim.float(), logits.view(-1, k, 2))


@torch.no_grad()
def rerank_naive(enc: EncodedSplit, sims: torch.Tensor, k: int, side: Side, itm_fn: ItmFn) -> RerankedBlock:
    """The official loop: one fusion forward per query on its k candidates (reference, slow)."""
    k = min(k, sims.shape[1])
    idx, sim, logits = [], [], []
    for q in range(sims.shape[0]):
        topk_sim, topk_idx = sims[q].topk(k)
        query = torch.full_like(topk_idx, q)
        logits.append(itm_fn(*_pair_tensors(enc, side, query, topk_idx)).float())
        idx.append(topk_idx)
        sim.append(topk_sim.float())
    return RerankedBlock(torch.stack(idx), torch.stack(sim), torch.stack(logits))


def all_gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's [counts[r], ...] block in rank order (blocks padded to equal size).

    16-bit floats travel as their int16 bit patterns (gloo has no bfloat16; the copy is exact anyway)."""
    if len(counts) == 1:
        return x
    if x.dtype in (torch.float16, torch.bfloat16):
        return all_gather_rows(x.view(torch.int16), counts).view(x.dtype)
    pad = max(counts)
    padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def gather_block(block: RerankedBlock, num_rows: int, world_size: int) -> RerankedBlock:
    """All ranks' blocks -> the block of all `num_rows` rows (identity in one process)."""
    counts = [e - s for s, e in (row_range(num_rows, r, world_size) for r in range(world_size))]
    return RerankedBlock(*(all_gather_rows(t, counts) for t in (block.topk_idx, block.topk_sim, block.logits)))


def block_to_matrices(block: RerankedBlock, num_candidates: int, temp: float) -> dict[str, torch.Tensor]:
    """Scatter a full block into dense [Q, C] matrices of the re-ranking scores, -inf off the top k."""
    if not temp > 0:
        raise ValueError(f"ITC temperature {temp} must be > 0")
    out = {}
    for name, values in (
        ("itm", block.itm),
        ("itm_itc", block.itm + block.topk_sim),
        ("itm_itc_logit", block.itm_logodds + block.topk_sim / temp),
    ):
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
    """{score (SCORE_NAMES): (scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])}, fp32 on CPU.

    With world_size > 1 every rank must call this (collectives); all ranks return the same result.
    """
    sims = enc.similarity()  # [N_img, N_txt]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SCORE_NAMES}
    out["itc"] = [sims.cpu(), sims.T.contiguous().cpu()]
    sides: tuple[tuple[Literal["i2t", "t2i"], torch.Tensor], ...] = (("i2t", sims), ("t2i", sims.T))
    for side, side_sims in sides:
        start, end = row_range(side_sims.shape[0], rank, world_size)
        rows = torch.arange(start, end, device=side_sims.device)
        block = rerank_block(enc, side_sims, rows, k, side, itm_fn, pairs_per_batch, trim_padding)
        full = gather_block(block, side_sims.shape[0], world_size)
        for name, matrix in block_to_matrices(full, side_sims.shape[1], enc.temp).items():
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


# --------------------------------------------------------------------------------------------------
# Grouped by image: cached keys/values, packed captions, both sides at once
# --------------------------------------------------------------------------------------------------


@dataclass
class PairSet:
    """The (image, caption) pairs both sides re-rank, deduplicated and sorted by (image, caption)."""

    image: torch.Tensor  # int64 [P] image of each unique pair (non-decreasing)
    text: torch.Tensor  # int64 [P] caption of each unique pair
    image_start: torch.Tensor  # int64 [N_img + 1] pairs of image i are [image_start[i], image_start[i + 1])
    inverse: torch.Tensor  # int64 [N_img * k_i2t + N_txt * k_t2i]: unique pair of each side's pair
    i2t: tuple[torch.Tensor, torch.Tensor]  # (topk_sim, topk_idx) [N_img, k_i2t]
    t2i: tuple[torch.Tensor, torch.Tensor]  # (topk_sim, topk_idx) [N_txt, k_t2i]


def pair_set(sims: torch.Tensor, k: int) -> PairSet:
    """Top k of every image (i2t) and of every caption (t2i) of sims [N_img, N_txt], merged by pair."""
    n_img, n_txt = sims.shape
    i2t_sim, i2t_idx = sims.topk(min(k, n_txt), dim=1)
    t2i_sim, t2i_idx = sims.T.topk(min(k, n_img), dim=1)
    device = i2t_idx.device
    img = torch.cat([torch.arange(n_img, device=device).repeat_interleave(i2t_idx.shape[1]), t2i_idx.reshape(-1)])
    txt = torch.cat([i2t_idx.reshape(-1), torch.arange(n_txt, device=device).repeat_interleave(t2i_idx.shape[1])])
    unique, inverse = torch.unique(img * n_txt + txt, return_inverse=True)  # sorted: grouped by image
    image, text = unique // n_txt, unique % n_txt
    counts = torch.bincount(image, minlength=n_img)
    image_start = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return PairSet(image, text, image_start, inverse, (i2t_sim.float(), i2t_idx), (t2i_sim.float(), t2i_idx))


def image_range(image_start: torch.Tensor, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [first, end) images of `rank`, balanced by pair count (whole images per rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    total = int(image_start[-1])
    # image i goes to the rank whose share of the pair range holds its first pair
    owner = (image_start[:-1] * world_size // max(total, 1)).clamp(max=world_size - 1)
    first = int((owner < rank).sum())
    return first, first + int((owner == rank).sum())


@torch.no_grad()
def packed_text_prefix(
    model: GroupedItmModel, enc: EncodedSplit, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`itm_text_prefix` of every caption and its first cross-attention queries, packed without padding.

    Returns (rows [T, D], query rows [T, D], first row of each caption int64 [N_txt], tokens per caption
    int64 [N_txt]).
    """
    rows, queries = [], []
    for s in range(0, enc.text_mask.shape[0], batch_size):
        mask = enc.text_mask[s : s + batch_size]
        prefix = PackedTokens.from_mask(mask).pack(model.itm_text_prefix(enc.text_hidden[s : s + batch_size], mask))
        rows.append(prefix)
        queries.append(model.itm_prefix_query(prefix))
    lengths = enc.text_mask.bool().sum(dim=1)
    return torch.cat(rows), torch.cat(queries), torch.cumsum(lengths, 0) - lengths, lengths


@torch.no_grad()
def score_pairs_grouped(
    model: GroupedItmModel,
    enc: EncodedSplit,
    pairs: PairSet,
    images: tuple[int, int],
    pairs_per_batch: int = 1024,
    text_batch_size: int = 256,
) -> torch.Tensor:
    """ITM logits (fp32) of the pairs of images [first, end): [image_start[end] - image_start[first], 2].

    Per image: keys/values of every fusion layer once, then its captions in chunks of
    `pairs_per_batch` (chunk boundaries depend on the image's pairs only, not on the world size).
    """
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch={pairs_per_batch} must be >= 1")
    first, end = images
    lo, hi = int(pairs.image_start[first]), int(pairs.image_start[end])
    out = torch.empty(hi - lo, 2, dtype=torch.float32, device=pairs.image.device)
    if hi == lo:
        return out
    prefix, query, text_first, lengths = packed_text_prefix(model, enc, text_batch_size)
    starts = pairs.image_start.tolist()
    for image in range(first, end):
        if starts[image] == starts[image + 1]:
            continue
        kv = model.itm_image_kv(enc.image_embeds[image : image + 1])  # [1, H, N, d] per fusion layer
        for s in range(starts[image], starts[image + 1], pairs_per_batch):
            e = min(s + pairs_per_batch, starts[image + 1])
            texts = pairs.text[s:e]
            n = lengths[texts]
            width = int(enc.text_mask[texts].nonzero()[:, 1].max()) + 1  # last real token of the chunk
            tokens = PackedTokens.from_mask(enc.text_mask[texts, :width])
            # rows of each caption, caption after caption: first[t], first[t] + 1, ..., first[t] + n[t] - 1
            offsets = torch.cumsum(n, 0) - n
            within = torch.arange(int(n.sum()), device=n.device) - offsets.repeat_interleave(n)
            rows = text_first[texts].repeat_interleave(n) + within
            logits = model.itm_logits_one_image(prefix[rows], tokens, kv, query[rows])
            out[s - lo : e - lo] = logits.float()
    return out


def score_matrices_grouped(
    enc: EncodedSplit,
    k: int,
    model: GroupedItmModel,
    *,
    rank: int = 0,
    world_size: int = 1,
    pairs_per_batch: int = 1024,
    text_batch_size: int = 256,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`score_matrices` through the grouped path (see module doc): same keys, same shapes, same
    candidates; ITM scores equal up to float summation order. Collective when world_size > 1."""
    sims = enc.similarity()  # [N_img, N_txt]
    pairs = pair_set(sims, k)
    images = image_range(pairs.image_start, rank, world_size)
    local = score_pairs_grouped(model, enc, pairs, images, pairs_per_batch, text_batch_size)
    counts = [
        int(pairs.image_start[e] - pairs.image_start[f])
        for f, e in (image_range(pairs.image_start, r, world_size) for r in range(world_size))
    ]
    scores = all_gather_rows(local, counts)[pairs.inverse]  # every side's pair, in side order
    n_i2t = pairs.i2t[1].numel()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SCORE_NAMES}
    out["itc"] = [sims.cpu(), sims.T.contiguous().cpu()]
    sides = ((pairs.i2t, scores[:n_i2t], sims.shape[1]), (pairs.t2i, scores[n_i2t:], sims.shape[0]))
    for (sim, idx), logits, num_candidates in sides:
        block = RerankedBlock(idx, sim, logits.view(*idx.shape, 2))
        for name, matrix in block_to_matrices(block, num_candidates, enc.temp).items():
            out[name].append(matrix.cpu())
    logger.info(
        "re-ranked %d unique pairs (i2t top %d, t2i top %d) grouped by image; images %d-%d on rank %d",
        pairs.image.numel(),
        pairs.i2t[1].shape[1],
        pairs.t2i[1].shape[1],
        *images,
        rank,
    )
    return {name: (pair[0], pair[1]) for name, pair in out.items()}
