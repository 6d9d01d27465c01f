"""Recall@K on hand-built score matrices whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.retrieval.metrics import (
    chance_metrics,
    paired_r1_difference,
    query_ranks,
    ranks_from_scores,
    recall_at_k,
    retrieval_metrics,
)

INF = float("-inf")


def _official_itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict:
    """The official ALBEF `itm_eval` loop, verbatim in logic (valid when there are no ties)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2]}
    out["txt_r_mean"], out["img_r_mean"] = sum(tr) / 3, sum(ir) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def test_ranks_single_positive_known_answer() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    positives = torch.eye(3, dtype=torch.bool)
    # row 0: positive 0.9 is top -> 0; row 1: 0.3 below 0.8 -> 1; row 2: 0.1 below 0.7, 0.6 -> 2
    assert ranks_from_scores(scores, positives).tolist() == [0, 1, 2]


def test_ties_are_pessimistic() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    positives = torch.tensor([[True, False, False], [False, True, False]])
    # row 0: both negatives tie with the positive -> rank 2; row 1: one tying negative -> rank 1
    assert ranks_from_scores(scores, positives).tolist() == [2, 1]
    # a constant-score model must score zero recall@1, not 100
    assert recall_at_k(ranks_from_scores(torch.zeros(4, 4), torch.eye(4, dtype=torch.bool)), (1,))[1] == 0.0


def test_multiple_captions_best_rank_and_ties_between_positives() -> None:
    # image 0 owns captions {0, 1}; image 1 owns {2, 3}
    scores_i2t = torch.tensor(
        [
            [0.1, 0.8, 0.9, 0.2],  # best positive 0.8 (caption 1) is behind one negative (0.9) -> rank 1
            [0.3, 0.1, 0.7, 0.7],  # two positives tie at the top: they do not push each other -> rank 0
        ]
    )
    positives = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert ranks_from_scores(scores_i2t, positives).tolist() == [1, 0]


def test_unscored_minus_inf_never_counts_as_hit() -> None:
    # the positive (column 3) was outside the re-ranked top 2: it ties with the other unscored ones
    scores = torch.tensor([[5.0, 4.0, INF, INF, INF]])
    positives = torch.tensor([[False, False, False, True, False]])
    ranks = ranks_from_scores(scores, positives)
    assert ranks.tolist() == [4]
    assert recall_at_k(ranks, (1, 5, 10)) == {1: 0.0, 5: 100.0, 10: 100.0}


def test_full_metrics_known_values_with_k_beyond_candidates() -> None:
    # 3 images x 6 captions (2 each); with only 3 images img_r5 = img_r10 = 100 by construction
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    scores_i2t = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # rank 0
            [9.0, 8.0, 7.0, 1.0, 0.0, 0.5],  # best positive 7 behind 9, 8 -> rank 2
            [9.0, 8.0, 7.0, 6.0, 5.0, 1.0],  # best positive 5 behind 4 negatives -> rank 4
        ]
    )
    scores_t2i = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # image 0 -> rank 0
            [1.0, 2.0, 3.0],  # rank 2
            [0.0, 3.0, 1.0],  # image 1 -> rank 0
            [5.0, 4.0, 3.0],  # rank 1
            [1.0, 1.0, 1.0],  # image 2, tie with two negatives -> rank 2
            [0.0, 0.0, 9.0],  # rank 0
        ]
    )
    m = retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100.0)  # ranks 0, 2, 4 are all < 5
    assert m["txt_r10"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(50.0)  # ranks 0,2,0,1,2,0 -> 3 of 6
    assert m["img_r5"] == m["img_r10"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx(250 / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_k_smaller_than_candidates_matches_official_loop_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    n_img, per = 40, 5
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    s = rng.standard_normal((n_img, n_img * per)).astype(np.float32)
    s[np.arange(n_img), np.arange(n_img) * per] += 2.0  # some signal, so recalls are not all ~0
    s_t2i = rng.standard_normal((n_img * per, n_img)).astype(np.float32) + 1.5 * np.eye(n_img)[txt2img]
    ours = retrieval_metrics(torch.from_numpy(s), torch.from_numpy(s_t2i), img2txt, txt2img)
    ref = _official_itm_eval(s, s_t2i, txt2img, img2txt)
    assert ours == pytest.approx(ref)
    assert 0 < ours["img_r1"] < ours["img_r10"] < 100


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="positive"):
        ranks_from_scores(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="disagree"):
        retrieval_metrics(torch.zeros(2, 2), torch.zeros(2, 2), [[0], [1]], [1, 0])
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(2, 3), torch.zeros(2, 3), [[0], [1, 2]], [0, 1, 1])


def test_chance_levels() -> None:
    img2txt = [list(range(i * 5, i * 5 + 5)) for i in range(100)]
    chance = chance_metrics(img2txt, 500)
    assert chance["img_r1"] == pytest.approx(1.0)
    assert chance["img_r10"] == pytest.approx(10.0)
    # 1 - C(495,1)/C(500,1) = 1%; R@10 = 1 - prod_{j<10} (495-j)/(500-j) ~ 9.6%
    assert chance["txt_r1"] == pytest.approx(1.0)
    assert chance["txt_r10"] == pytest.approx(100 * (1 - np.prod([(495 - j) / (500 - j) for j in range(10)])))
    # a uniformly random score matrix averages close to chance
    g = torch.Generator().manual_seed(0)
    txt2img = [t // 5 for t in range(500)]
    rnd = [
        retrieval_metrics(torch.rand(100, 500, generator=g), torch.rand(500, 100, generator=g), img2txt, txt2img)
        for _ in range(5)
    ]
    assert np.mean([m["img_r10"] for m in rnd]) == pytest.approx(chance["img_r10"], abs=2.0)


def test_paired_r1_difference_counts_changed_top1_and_its_error() -> None:
    # 4 images x 1 caption each; identity = every query right. The re-ranker breaks image 0's and
    # caption 1's top-1 and fixes nothing: text side -25 points, image side -25 points.
    img2txt, txt2img = [[0], [1], [2], [3]], [0, 1, 2, 3]
    base = torch.eye(4)
    new_i2t, new_t2i = torch.eye(4), torch.eye(4)
    new_i2t[0, 3] = 2.0  # image 0 now prefers caption 3
    new_t2i[1, 2] = 2.0  # caption 1 now prefers image 2
    base_ranks = query_ranks((base, base.clone()), img2txt, txt2img)
    out = paired_r1_difference(query_ranks((new_i2t, new_t2i), img2txt, txt2img), base_ranks)
    d = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    se = 100.0 * d.std().item() / 2.0  # std(d) / sqrt(4)
    for side in ("txt_r1", "img_r1"):
        assert out[side] == {"diff": -25.0, "se": pytest.approx(se), "gained": 0, "lost": 1}, side
    assert out["r1_mean"]["diff"] == -25.0 and out["r1_mean"]["se"] == pytest.approx(math.hypot(se, se) / 2)
    # the same ranking twice: no change, no error
    same = paired_r1_difference(base_ranks, base_ranks)
    assert same["r1_mean"] == {"diff": 0.0, "se": 0.0}
