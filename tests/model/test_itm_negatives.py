"""ALBEFConfig.itm_negatives: hard negatives by ITC similarity (ALBEF), uniform in-batch ones, or a
coin flip between the two per image and per text (issue 11)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import ALBEFConfig, ModelConfigError, build_albef
from model.retrieval import build_retrieval

B, DRAWS = 8, 40


def make_batch(cfg: ALBEFConfig, batch: int = B) -> dict:
    gen = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    ids = torch.randint(1000, 2000, (batch, 10), generator=gen)
    ids[:, 0] = 101
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[:, 3] = ids[:, 3]
    return {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": ids.masked_fill(mlm_labels != -100, 103),
        "mlm_labels": mlm_labels,
        "alpha": 0.4,
    }


@torch.no_grad()
def _draws(kind: str) -> torch.Tensor:  # same model, batch and seeds for every kind
    """[DRAWS, 2, B] negative (image for each text, text for each image) indices of repeated forwards
    on one batch; temp 0.001 makes the ITC softmax nearly one-hot, so hard draws barely vary."""
    torch.manual_seed(0)
    model = build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000, temp=0.001, itm_negatives=kind)).eval()
    batch = make_batch(model.config, batch=B)
    gen = torch.Generator().manual_seed(0)
    outs = [model(**batch, generator=gen) for _ in range(DRAWS)]
    return torch.stack([torch.stack([o.neg_image_idx, o.neg_text_idx]) for o in outs])


def _distinct_per_row(draws: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[draws[:, d, b].unique().numel() for b in range(B)] for d in range(2)])


def test_random_negatives_are_uniform_and_never_the_positive() -> None:
    draws = _draws("random")
    assert not torch.any(draws == torch.arange(B)), "a positive drawn as its own negative"
    # B - 1 = 7 candidates, 40 draws: each is missed with probability (6/7)^40 ~ 0.2%
    assert _distinct_per_row(draws).min() >= 6
    counts = torch.bincount(draws.flatten(), minlength=B).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean(), counts


def test_hard_negatives_follow_the_similarity() -> None:
    draws = _draws("hard")
    assert not torch.any(draws == torch.arange(B))
    assert _distinct_per_row(draws).float().median() <= 2  # nearly the argmax at temp 0.001


def test_mixed_negatives_are_half_hard_half_uniform() -> None:
    """Per row: the (near one-hot) hard choice about half the time plus 1/7 of the uniform half (~57%),
    the other candidates from the uniform half; never the positive."""
    draws = _draws("mixed")
    hard = _draws("hard")[0]  # [2, B]: at temp 0.001 the hard draw is (nearly) the argmax
    assert not torch.any(draws == torch.arange(B))
    share_of_hard_choice = (draws == hard).float().mean(0)  # [2, B]
    assert share_of_hard_choice.min() > 0.3 and share_of_hard_choice.max() < 0.85, share_of_hard_choice
    assert 0.45 < share_of_hard_choice.mean() < 0.7, share_of_hard_choice.mean()
    assert _distinct_per_row(draws).min() >= 4  # the uniform half reaches the other candidates


@pytest.mark.parametrize("kind", ["random", "mixed"])
def test_negatives_exclude_same_image_pairs_in_retrieval(kind: str) -> None:
    """Fine-tuning: pairs sharing an image id are positives, never drawn as negatives."""
    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(queue_size=16, vocab_size=3000, itm_negatives=kind)
    model = build_retrieval(cfg).eval()
    batch = {k: v for k, v in make_batch(cfg, batch=B).items() if not k.startswith("mlm")}
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(10):
            out = model(**batch, idx=idx, generator=gen)
            assert not torch.any(idx[out.neg_image_idx] == idx) and not torch.any(idx[out.neg_text_idx] == idx)


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ModelConfigError) as info:
        dataclasses.replace(ALBEFConfig.tiny(), itm_negatives="easy")
    assert info.value.field == "itm_negatives"
