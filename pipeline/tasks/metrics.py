"""Metrics of the downstream tasks: VQA accuracy, classification accuracy, grounding accuracy.

Pure functions over predictions and labels (no model, no files), so each is tested on hand-built
cases and shared by the training stages' validation and the `albef evaluate <task>` stages.

VQA accuracy is the official VQA v2 evaluation's: a predicted answer scores min(#humans who gave
it / 3, 1), averaged over the 10 leave-one-annotator-out subsets of the 10 human answers (so 3
matching humans give (3 * 2/3 + 7 * 1) / 10 = 0.9; see `vqa_score`). Predicted and human answers are
normalised as the official evaluation does (punctuation, number words, articles); its table of
~170 contractions ("dont" -> "don't") is not reproduced, which only matters for answers spelled
without the apostrophe (documented in `normalize_vqa_answer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "VQA_HUMAN_ANSWERS",
    "classification_accuracy",
    "grounding_accuracy",
    "normalize_vqa_answer",
    "per_split_accuracy",
    "vqa_accuracy",
    "vqa_score",
]

VQA_HUMAN_ANSWERS = 10  # answers per question in VQA v2 annotations
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # "2.5" keeps its point, "yes." loses it


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (without its contractions table).

    - newlines/tabs -> spaces, surrounding whitespace stripped, lower-cased;
    - each punctuation mark of `_PUNCT` is deleted when it touches a space or the answer holds a
      "digit,digit" group ("1,000" -> "1000"), else replaced by a space ("black-white" ->
      "black white"); a period is deleted unless a digit follows;
    - number words zero..ten (and "none") -> digits; articles a/an/the dropped.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    has_number_group = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        touches_space = f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if touches_space or has_number_group else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers of its question, in [0, 1].

    For each human answer h_i: acc_i = min(#{j != i : h_j == prediction} / 3, 1); the score is the
    mean of acc_i over i (the official "10 choose 9" average). With 10 answers: 0 matches -> 0,
    1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.
    """
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(h) == pred for h in human_answers)
    # Leaving out a matching answer leaves matches - 1 others, a non-matching one leaves matches.
    n = len(human_answers)
    left_out_match = matches * min((matches - 1) / 3, 1.0)
    left_out_other = (n - matches) * min(matches / 3, 1.0)
    return (left_out_match + left_out_other) / n


def vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_score` over questions, in percent."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    if not predictions:
        raise ValueError("no question to score")
    return 100.0 * sum(vqa_score(p, h) for p, h in zip(predictions, human_answers)) / len(predictions)


def classification_accuracy(predictions: torch.Tensor | Sequence[int], targets: torch.Tensor | Sequence[int]) -> float:
    """Percent of predictions equal to their target. `predictions`: class ids [N] or logits [N, C]."""
    pred = torch.as_tensor(predictions)
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    tgt = torch.as_tensor(targets)
    if pred.shape != tgt.shape or pred.ndim != 1:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(tgt.shape)} must be [N] each")
    if tgt.numel() == 0:
        raise ValueError("no sample to score")
    return 100.0 * (pred.long() == tgt.long()).double().mean().item()


def per_split_accuracy(correct: Iterable[bool], splits: Iterable[str]) -> dict[str, float]:
    """{split: percent correct} over the splits that occur (an empty split is absent, not 0/0)."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for ok, split in zip(correct, splits, strict=True):
        totals[split] = totals.get(split, 0) + 1
        hits[split] = hits.get(split, 0) + bool(ok)
    return {s: 100.0 * hits[s] / totals[s] for s in sorted(totals)}


def grounding_accuracy(ious: Sequence[float | None], splits: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Weakly supervised grounding: {split: percent of refs whose chosen box has IoU >= threshold}.

    `ious[j]` is the IoU of ref j's predicted box with its ground truth (model.heads.grounding
    `box_iou`), None when no proposal scored above 0: such a ref counts as a miss (the official
    `grounding_eval` reused the previous ref's box there, or crashed on the first ref).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return per_split_accuracy((iou is not None and iou >= threshold for iou in ious), splits)
