"""Batched ITM re-ranking returns the scores of the official one-query-at-a-time loop."""

from __future__ import annotations

import pytest
import torch

from model import ALBEFConfig
from model.retrieval import build_retrieval
from pipeline.retrieval.rerank import (
    SCORE_NAMES,
    EncodedSplit,
    block_to_matrices,
    rerank_block,
    rerank_naive,
    row_range,
    score_matrices,
)


def tiny_encoded(n_img: int = 12, per_image: int = 3, seed: int = 0):
    """A tiny random retrieval model and its encoded split (variable caption lengths, padded)."""
    torch.manual_seed(seed)
    model = build_retrieval(ALBEFConfig.tiny(image_size=32, queue_size=8)).eval()
    n_txt = n_img * per_image
    ids = torch.randint(1000, 3000, (n_txt, 9))
    mask = torch.ones_like(ids)
    lengths = torch.randint(3, 10, (n_txt,))
    for t, n in enumerate(lengths.tolist()):
        mask[t, n:] = 0
        ids[t, n:] = 0
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.randn(n_img, 3, 32, 32))
        text_hidden, text_feat = model.encode_text(ids, mask)
    return model, EncodedSplit(image_embeds, image_feat, text_hidden, mask, text_feat, float(model.clamped_temp()))


def _itm_fn(model):
    return lambda img, txt, msk: model.itm_logits(txt, msk, img)


def _itm_cls_fn(model):
    return lambda img, txt, msk: model.itm_logits_cls(txt, msk, img)


@pytest.mark.parametrize("side", ["i2t", "t2i"])
@pytest.mark.parametrize("pairs_per_batch", [5, 64, 4096])
def test_batched_equals_naive_loop(side: str, pairs_per_batch: int) -> None:
    model, enc = tiny_encoded()
    sims = enc.similarity() if side == "i2t" else enc.similarity().T
    k = 7
    naive = rerank_naive(enc, sims, k, side, _itm_fn(model))
    rows = torch.arange(sims.shape[0])
    batched = rerank_block(enc, sims, rows, k, side, _itm_fn(model), pairs_per_batch, trim_padding=False)
    assert torch.equal(batched.topk_idx, naive.topk_idx)
    assert torch.equal(batched.topk_sim, naive.topk_sim)
    assert torch.equal(batched.itm, naive.itm)  # bit-exact on the CPU (row results do not depend on the batch)
    assert torch.equal(batched.itm_logodds, naive.itm_logodds)
    # the fast path (length buckets, [CLS]-only last layer): the same numbers up to float summation
    # order, the same rankings
    trimmed = rerank_block(enc, sims, rows, k, side, _itm_cls_fn(model), pairs_per_batch, trim_padding=True)
    assert torch.equal(trimmed.topk_idx, naive.topk_idx)
    assert torch.allclose(trimmed.itm, naive.itm, rtol=0, atol=1e-5)
    assert torch.allclose(trimmed.itm_logodds, naive.itm_logodds, rtol=0, atol=1e-5)
    assert torch.equal(trimmed.itm.argsort(dim=1), naive.itm.argsort(dim=1))
    assert naive.itm.std() > 0  # a real signal, not constant scores


def test_k_larger_than_candidates_is_clamped_and_matrix_fill() -> None:
    model, enc = tiny_encoded(n_img=4, per_image=2)
    sims = enc.similarity().T  # 8 text queries x 4 images
    block = rerank_block(enc, sims, torch.arange(8), 50, "t2i", _itm_fn(model))
    assert block.topk_idx.shape == (8, 4)
    matrices = block_to_matrices(block, 4, enc.temp)
    assert torch.isfinite(matrices["itm"]).all()  # every candidate was re-ranked
    small = block_to_matrices(rerank_block(enc, sims, torch.arange(8), 2, "t2i", _itm_fn(model)), 4, enc.temp)
    assert (torch.isinf(small["itm"]).sum(dim=1) == 2).all()  # 2 of 4 left unscored per row
    for name in ("itm_itc", "itm_itc_logit"):  # the same candidates scored
        assert torch.equal(torch.isfinite(small[name]), torch.isfinite(small["itm"])), name


def test_score_matrices_shapes_and_combined_scores() -> None:
    model, enc = tiny_encoded(n_img=5, per_image=2)
    out = score_matrices(enc, 3, _itm_fn(model), pairs_per_batch=4)
    assert tuple(out) == SCORE_NAMES
    i2t, t2i = out["itc"]
    assert i2t.shape == (5, 10) and t2i.shape == (10, 5) and torch.equal(i2t.T, t2i)
    itm_i2t, _ = out["itm"]
    both_i2t, _ = out["itm_itc"]
    finite = torch.isfinite(itm_i2t)
    assert (finite.sum(dim=1) == 3).all()
    assert torch.allclose(both_i2t[finite], itm_i2t[finite] + i2t[finite])
    # ITM log-odds + ITC logit, recomputed from the model's logits of the scored pairs
    img, txt = finite.nonzero(as_tuple=True)
    logits = model.itm_logits(enc.text_hidden[txt], enc.text_mask[txt], enc.image_embeds[img])
    expected = logits[:, 1] - logits[:, 0] + i2t[finite] / float(model.clamped_temp())
    logit_i2t, _ = out["itm_itc_logit"]
    assert torch.allclose(logit_i2t[finite], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logit_i2t[finite], both_i2t[finite])  # a different score, not a relabelling


def test_itc_temperature_must_be_positive() -> None:
    model, enc = tiny_encoded(n_img=4, per_image=2)
    block = rerank_block(enc, enc.similarity(), torch.arange(4), 2, "i2t", _itm_fn(model))
    with pytest.raises(ValueError, match="temperature"):
        block_to_matrices(block, 8, 0.0)


def test_row_range_partitions() -> None:
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            ranges = [row_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        row_range(5, 2, 2)
