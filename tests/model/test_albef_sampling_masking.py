"""Hard-negative sampling (never the positive, B=2, no NaN) and MLM masking (specials, 80/10/10)."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import sample_hard_negatives
from model.masking import mask_tokens

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522


def draws(sim: torch.Tensor, n: int = 200, seed: int = 0, queue: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` draws from a square in-batch similarity matrix (+ `queue` extra columns, which are ignored)."""
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(sim.shape[0], queue, generator=gen).to(sim.dtype)
    sim_i2t, sim_t2i = torch.cat([sim, extra], dim=1), torch.cat([sim.t(), extra], dim=1)
    pairs = [sample_hard_negatives(sim_i2t, sim_t2i, generator=gen) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize(
    "sim",
    [
        torch.randn(8, 8) * 5,  # ordinary
        torch.randn(8, 8) * 1e4,  # huge (one-hot softmax rows)
        torch.full((8, 8), 1e30),  # huge and equal
        torch.zeros(8, 8),  # all equal
        torch.eye(8) * 1e30,  # positives dominate: their exclusion must not leave 0/0
        torch.randn(8, 8).to(torch.bfloat16) * 100,  # low-precision input
    ],
    ids=["random", "huge", "huge-equal", "equal", "huge-diagonal", "bf16"],
)
def test_hard_negatives_never_positive_and_never_nan(sim: torch.Tensor) -> None:
    neg_image, neg_text = draws(sim, queue=5)
    positives = torch.arange(8).expand_as(neg_image)
    for idx in (neg_image, neg_text):
        assert idx.dtype == torch.long and ((idx >= 0) & (idx < 8)).all()
        assert not (idx == positives).any()


def test_equal_similarities_sample_uniformly_off_diagonal() -> None:
    neg_image, _ = draws(torch.zeros(4, 4), n=3000)
    counts = torch.stack([(neg_image[:, 0] == j).sum() for j in range(4)]).float()
    assert counts[0] == 0
    expected, sd = 3000 / 3, math.sqrt(3000 * (1 / 3) * (2 / 3))
    assert ((counts[1:] - expected).abs() < 5 * sd).all(), counts


def test_batch_of_two_picks_the_other_and_one_is_refused() -> None:
    neg_image, neg_text = draws(torch.tensor([[9.0, -9.0], [-9.0, 9.0]]))
    assert (neg_image == torch.tensor([1, 0])).all() and (neg_text == torch.tensor([1, 0])).all()
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 5), torch.zeros(1, 5))


def test_exclusion_mask_never_draws_a_same_image_pair() -> None:
    idx = torch.tensor([1, 1, 2, 2, 3, 4])
    same = idx[:, None] == idx[None, :]
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(6, 6 + 8, generator=g) * 5
    sims[:, :6] += same * 30.0  # same-image pairs would be by far the most likely draws
    for _ in range(50):
        neg_img, neg_txt = sample_hard_negatives(sims, sims.flip(0), exclude=same, generator=g)
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()
    # a batch of one image: every entry excluded -> fall back to "not the diagonal" rather than NaN
    neg_img, neg_txt = sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), exclude=torch.ones(2, 2).bool())
    assert neg_img.tolist() == [1, 0] and neg_txt.tolist() == [1, 0]
    with pytest.raises(ValueError, match="exclude"):
        sample_hard_negatives(sims, sims, exclude=same[:3])


def test_default_exclusion_is_the_diagonal() -> None:
    sims = torch.randn(5, 9) * 3
    a = sample_hard_negatives(sims, sims.flip(0), generator=torch.Generator().manual_seed(4))
    b = sample_hard_negatives(
        sims, sims.flip(0), exclude=torch.eye(5, dtype=torch.bool), generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def random_batch(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(1000, VOCAB, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    pos = torch.arange(length)[None]
    ids[pos == lengths[:, None] - 1] = SEP
    ids[pos >= lengths[:, None]] = PAD
    ids[:, 0] = CLS
    return ids


def test_masking_never_touches_special_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = random_batch(256, 30, gen)
    original = ids.clone()
    out, labels = mask_tokens(
        ids, vocab_size=VOCAB, mask_token_id=MASK, special_token_ids=[PAD, CLS, SEP], probability=0.9, generator=gen
    )
    assert torch.equal(ids, original), "input must not be modified"
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    assert torch.equal(out[special], ids[special])
    assert (labels[special] == -100).all()
    masked = labels != -100
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(out[~masked], ids[~masked])
    assert masked[~special].float().mean() > 0.8  # probability 0.9 of the non-special tokens


def test_masking_follows_80_10_10_at_a_fixed_seed() -> None:
    gen = torch.Generator().manual_seed(1)
    ids = random_batch(2000, 40, gen)
    out, labels = mask_tokens(
        ids, vocab_size=VOCAB, mask_token_id=MASK, special_token_ids=[PAD, CLS, SEP], probability=0.15, generator=gen
    )
    eligible = ~((ids == PAD) | (ids == CLS) | (ids == SEP))
    masked = labels != -100
    n_eligible, n = int(eligible.sum()), int(masked.sum())

    def within(count: int, total: int, p: float) -> bool:  # 5 standard deviations of a binomial
        return abs(count - total * p) <= 5 * math.sqrt(total * p * (1 - p))

    assert within(n, n_eligible, 0.15), (n, n_eligible)
    as_mask = int((out[masked] == MASK).sum())
    kept = int((out[masked] == ids[masked]).sum())
    randomised = n - as_mask - kept
    assert within(as_mask, n, 0.8) and within(kept, n, 0.1) and within(randomised, n, 0.1), (as_mask, kept, randomised)


def test_masking_is_reproducible_with_a_generator() -> None:
    ids = random_batch(8, 12, torch.Generator().manual_seed(3))
    kwargs = {"vocab_size": VOCAB, "mask_token_id": MASK, "special_token_ids": [PAD, CLS, SEP]}
    a = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, **kwargs, probability=1.5)


def test_official_exclusions_leave_sep_maskable() -> None:
    """The official mask() excludes [PAD] and [CLS] only: [SEP] is masked at the same rate as words."""
    gen = torch.Generator().manual_seed(2)
    ids = random_batch(2000, 30, gen)
    ids[torch.arange(ids.shape[0]), (ids != PAD).sum(1) - 1] = SEP  # [CLS] x ... [SEP] [PAD]...
    _, labels = mask_tokens(
        ids, vocab_size=VOCAB, mask_token_id=MASK, special_token_ids=[PAD, CLS], probability=0.15, generator=gen
    )
    masked = labels != -100
    assert not masked[(ids == PAD) | (ids == CLS)].any()
    sep = ids == SEP
    n_sep, n_masked = int(sep.sum()), int(masked[sep].sum())
    assert abs(n_masked - 0.15 * n_sep) <= 5 * math.sqrt(n_sep * 0.15 * 0.85), (n_masked, n_sep)
