"""Task metrics on hand-built cases: VQA's 10-answer rule, classification and grounding accuracy."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.heads.grounding import box_iou
from pipeline.tasks.metrics import (
    classification_accuracy,
    grounding_accuracy,
    normalize_vqa_answer,
    per_split_accuracy,
    vqa_accuracy,
    vqa_score,
)


def _brute_force_vqa(prediction: str, answers: list[str]) -> float:
    """The definition literally: average over the 10 subsets of 9 answers of min(matches / 3, 1)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == prediction for i in s) / 3, 1.0) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_follows_the_ten_choose_nine_rule(matches: int, expected: float) -> None:
    answers = ["two"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_score("two", answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_score("two", answers) == pytest.approx(_brute_force_vqa("2", [normalize_vqa_answer(a) for a in answers]))


def test_vqa_score_is_not_the_simple_min_rule() -> None:
    # 3 matching humans: min(3/3, 1) = 1 under the simple rule, 0.9 under the official average.
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_score("yes", answers) == pytest.approx(0.9)
    assert vqa_score("no", answers) == pytest.approx(1.0)
    assert vqa_score("maybe", answers) == 0.0


def test_vqa_normalisation() -> None:
    assert normalize_vqa_answer("  Two\n") == "2"
    assert normalize_vqa_answer("The Dog.") == "dog"
    assert normalize_vqa_answer("a red-white  flag") == "red white flag"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("2.5") == "2.5"
    assert normalize_vqa_answer("yes, it is") == "yes it is"  # the comma touches a space: deleted
    assert normalize_vqa_answer("none") == "0"
    # Normalised on both sides: "Two" matches human "2" and "two".
    assert vqa_score("Two", ["2", "two", "2.", "3", "4", "5", "6", "7", "8", "9"]) == pytest.approx(0.9)


def test_vqa_accuracy_means_over_questions_in_percent() -> None:
    q1 = ["cat"] * 10
    q2 = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy(["cat", "red"], [q1, q2]) == pytest.approx(100 * (1.0 + 0.6) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [q1])
    with pytest.raises(ValueError):
        vqa_score("a", [])


def test_classification_accuracy_from_ids_and_logits() -> None:
    assert classification_accuracy([2, 1, 0, 2], [2, 1, 1, 0]) == pytest.approx(50.0)
    logits = torch.tensor([[0.1, 0.2, 3.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    assert classification_accuracy(logits, torch.tensor([2, 0, 2])) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        classification_accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        classification_accuracy([], [])


def test_per_split_accuracy_skips_empty_splits() -> None:
    got = per_split_accuracy([True, False, True, True], ["dev", "dev", "test", "test"])
    assert got == {"dev": 50.0, "test": 100.0}
    with pytest.raises(ValueError):
        per_split_accuracy([True], ["dev", "test"])


def test_grounding_accuracy_at_iou_half() -> None:
    gt = [10, 10, 20, 20]
    exact = box_iou(gt, gt)
    half = box_iou(gt, [10, 10, 20, 10])  # 200 / 400 inclusive pixels
    below = box_iou(gt, [10, 10, 20, 9])
    assert (exact, half) == (1.0, 0.5) and below < 0.5
    ious = [exact, half, below, None, 0.0, 0.75]
    splits = ["val", "val", "testA", "testA", "testB", "testB"]
    assert grounding_accuracy(ious, splits) == {"testA": 0.0, "testB": 50.0, "val": 100.0}
    assert grounding_accuracy(ious, splits, threshold=0.8) == {"testA": 0.0, "testB": 0.0, "val": 50.0}
    with pytest.raises(ValueError):
        grounding_accuracy(ious, splits, threshold=0.0)
