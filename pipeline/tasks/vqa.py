"""VQA v2: answers and weights per batch, the model from a checkpoint, answer ranking and its report.

Shared by `albef finetune vqa` (build, per-epoch validation) and `albef evaluate vqa`
(pipeline/stages/{finetune,evaluate}_vqa.py); neither stage imports the other.

Data: `albef prep vqa` folders; each sample is one image whose json carries its questions as
`captions` and one label per question {"question_id", "answers", "weights", "human_answers"}
(data_prep/sources/vqa.py), plus `answer_list.json` beside the shards (the candidate answers).
Training draws one question per image visit (the batch's `label`) and learns every unique answer of
it with its weight. Evaluation encodes each image once, fuses it with each of its questions, ranks the
candidate list (`ALBEFVQA.rank_answers`: top k_test by first-token probability, re-ranked by the
answer likelihood) and keeps the best: the official result JSON [{question_id, answer}] and, when the
split has answers, the VQA accuracy (pipeline/tasks/metrics.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from data_prep.sources.vqa import ANSWER_LIST  # written beside the shards by `albef prep vqa`
from model.config import ALBEFConfig
from model.convert import to_official
from model.heads.convert import convert_task_state, is_official_pretrain
from model.heads.ve import meta_shapes
from model.heads.vqa import ALBEFVQA, AnswerRanking, VQAConfig, build_vqa, load_vqa_state
from pipeline.config import check
from pipeline.data import build_eval_loader
from pipeline.data.text import tokenize
from pipeline.runtime.distributed import all_gather_objects
from pipeline.tasks.metrics import vqa_accuracy

logger = logging.getLogger(__name__)


def resolve_answer_list(answer_list: str | None, data: str | Path | None) -> Path | None:
    """The candidate-answer file: `answer_list` when given, else DATA/answer_list.json if it exists."""
    if answer_list is not None:
        return Path(answer_list)
    if data is not None and (Path(data) / ANSWER_LIST).is_file():
        return Path(data) / ANSWER_LIST
    return None


def read_answer_list(path: str | Path) -> list[str]:
    """A JSON list of answer strings (official answer_list.json or ours); ValueError when it is not one."""
    answers = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings")
    return answers


def drop_sep(
    ids: torch.Tensor, mask: torch.Tensor, sep_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids / masks [N, L] without [SEP]: the official ALBEF tokenizer emits `[CLS] text` only, so
    the official checkpoints saw questions so (and the official answers carry a '[SEP]' typed into the text)."""
    keep = ids != sep_token_id
    ids, mask = ids.masked_fill(~keep, pad_token_id), mask * keep
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def tokenize_questions(
    tokenizer: Any, questions: Sequence[str], max_tokens: int, question_sep: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned questions -> ids / mask [N, L]; `question_sep` False = the official `[CLS] question`."""
    ids, mask = tokenize(tokenizer, questions, max_tokens)
    if not question_sep:
        ids, mask = drop_sep(ids, mask, tokenizer.sep_token_id, tokenizer.pad_token_id)
    return ids, mask


def tokenize_answers(tokenizer: Any, answers: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers -> `[CLS] answer [SEP]` ids / mask [A, La] (as the official `answer + '[SEP]'`), raw text
    (the official code does not clean answers)."""
    return tokenize(tokenizer, answers, max_tokens)


def training_answers(
    labels: Sequence[dict[str, Any]],
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Flat answers, weights fp32 [N] and answers per question int64 [B] of a batch's drawn questions."""
    answers: list[str] = []
    weights: list[float] = []
    counts: list[int] = []
    for label in labels:
        if not isinstance(label, dict) or not label.get("answers"):
            raise ValueError(
                "a training question has no answers: data.train must be `albef prep vqa` folders of a split with "
                f"answers (got label {label!r})"
            )
        answers += label["answers"]
        weights += label["weights"]
        counts.append(len(label["answers"]))
    return answers, torch.tensor(weights, dtype=torch.float32), torch.tensor(counts, dtype=torch.long)


def _source_weights(state_dict: dict[str, torch.Tensor], distill: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as `load_vqa_state` takes them: a pretraining checkpoint of ours is put in
    the official layout (VQA.py's key loop then builds the decoder); without distillation the momentum
    twins are left out (no teacher to fill, nothing to report)."""
    if not any(k.startswith("text_decoder.") for k in state_dict) and not is_official_pretrain(state_dict):
        state_dict = to_official(state_dict)
    if not distill:
        state_dict = {k: v for k, v in state_dict.items() if not k.split(".", 1)[0].endswith("_m")}
    return state_dict


def check_vqa_weights(state_dict: dict[str, torch.Tensor], backbone: ALBEFConfig, distill: bool) -> None:
    """Raise ValueError naming the missing weights when the checkpoint cannot fill the VQA model (checked
    on the meta device, before any run folder is written)."""
    config = VQAConfig(backbone=backbone, distill=distill)
    _, report = convert_task_state(
        _source_weights(state_dict, distill),
        meta_shapes(build_vqa, config),
        task="vqa",
        fusion_layer=backbone.text.fusion_layer,
    )
    if report.missing:
        raise ValueError(
            f"the checkpoint does not fit the VQA model: {len(report.missing)} weights missing "
            f"(e.g. {report.missing[:3]}); expected an ALBEF pretraining or VQA checkpoint"
        )


def build_vqa_from_checkpoint(
    state_dict: dict[str, torch.Tensor], backbone: ALBEFConfig, distill: bool, first_token_twice: bool = False
) -> tuple[ALBEFVQA, Any]:
    """VQA model with `state_dict` loaded (a pretraining checkpoint of ours or official, an official
    VQA checkpoint, or one of our VQA runs); returns (model, conversion report).

    A pre-trained checkpoint fills the answer decoder through the official VQA.py key loop (from the
    fusion layers, embeddings and MLM head; ours is put in that layout first); every weight must come
    from the checkpoint (`load_vqa_state` raises otherwise), so DeiT-style silent non-loading cannot happen.
    """
    model = build_vqa(VQAConfig(backbone=backbone, distill=distill, first_token_twice=first_token_twice))
    return model, load_vqa_state(model, _source_weights(state_dict, distill))


@dataclass
class VQAEvalConfig:
    """VQA evaluation knobs (`--name=value` for `albef evaluate vqa`, `eval.*` in fine-tuning YAML).

    During fine-tuning's validation the model is in memory: image_res, preset, precision, device,
    dataset apply to `albef evaluate vqa` only.
    """

    k_test: int = 128  # candidates re-ranked per question (official VQA.yaml: 128)
    answer_list: str | None = (
        None  # candidate answers json; None = DATA/answer_list.json (fine-tuning: data.train[0]'s)
    )
    image_batch_size: int = 16  # images per ViT forward (official batch_size_test: 16 questions)
    questions_per_batch: int = 64  # questions per ranking forward (x k_test decoder rows: the memory knob)
    max_words: int = 30  # pre_caption word cut of the questions (official max_ques_words)
    max_tokens: int = 35  # question tokenizer max length
    max_answer_tokens: int = 16  # answer tokenizer max length ([CLS] answer [SEP])
    question_sep: bool = True  # False: questions as `[CLS] question` (the official tokenizer; official checkpoints)
    first_token_twice: bool = False  # True: the official ranking score (first answer token counted twice)
    num_workers: int = 4  # loader worker processes
    image_res: int | None = None  # px; None = the checkpoint's model resolution
    preset: Literal["auto", "tiny", "base"] = "auto"  # model size when the checkpoint carries no config
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = fp16 on a GPU, fp32 on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the bundled one
    dataset: str | None = None  # name in the output files; None = the manifest's `source`

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("k_test", "image_batch_size", "questions_per_batch", "max_words"):
            check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.max_tokens >= 3, f"{p}max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.max_answer_tokens >= 3, f"{p}max_answer_tokens", f"must be >= 3, got {self.max_answer_tokens}")
        check(self.num_workers >= 0, f"{p}num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.image_res is None or self.image_res >= 1, f"{p}image_res", f"must be >= 1, got {self.image_res}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{p}vocab", f"file not found: {self.vocab}")
        check(
            self.answer_list is None or Path(self.answer_list).is_file(),
            f"{p}answer_list",
            f"file not found: {self.answer_list}",
        )


@torch.no_grad()
def rank_questions(
    model: ALBEFVQA,
    images: torch.Tensor,
    image_index: torch.Tensor,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
) -> AnswerRanking:
    """`ALBEFVQA.rank_answers` for questions [N] on images [B] (question n on image image_index[n]): the
    ViT runs once per image, the question encoder on the repeated image tokens."""
    image_embeds = model.visual_encoder(images)
    states = model.text_encoder(question_ids, question_mask, image_embeds=image_embeds[image_index], mode="full")
    return model.rank_answers_from_states(states, question_mask, answer_ids, answer_mask, k)


def result_entry(question_id: str, answer: str) -> dict[str, Any]:
    """One entry of the official result JSON; the test server wants integer question ids."""
    return {"question_id": int(question_id) if question_id.isdigit() else question_id, "answer": answer}


@torch.no_grad()
def evaluate_vqa_model(
    model: ALBEFVQA,
    data: str | Path,
    answer_list: Sequence[str],
    cfg: VQAEvalConfig,
    device: torch.device,
    *,
    tokenizer: Any,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Answer every question of `data` from `answer_list`; collective when world_size > 1 (each rank
    answers its share of the shards; results are gathered). Every rank returns the same dict:
    {"results" [{question_id, answer}] sorted by question id, "accuracy" (None when the split has no
    answers), "majority_answer" / "majority_accuracy" (the one-answer baseline), "num_questions", "num_scored", "num_images", "bad_samples", "timings"}. The model's
    train/eval mode is restored afterwards."""
    loader = build_eval_loader(
        [data],
        batch_size=cfg.image_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        image_res=model.config.backbone.vision.image_size,
        max_words=cfg.max_words,
    )
    answer_ids, answer_mask = (t.to(device) for t in tokenize_answers(tokenizer, answer_list, cfg.max_answer_tokens))
    dtype = next(model.parameters()).dtype
    local: list[tuple[str, str, list[str]]] = []  # (question id, predicted answer, human answers)
    images_seen, bad = 0, 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for batch in loader:
            if "labels" not in batch:
                raise ValueError(f"{data}: samples carry no per-question `labels`; is it an `albef prep vqa` folder?")
            # Every question is answered, even one that cleaning emptied (the test server wants them all).
            questions = [
                (i, q, lab)
                for i, (qs, labs) in enumerate(zip(batch["captions"], batch["labels"]))
                for q, lab in zip(qs, labs)
            ]
            images = batch["image"].to(device, dtype=dtype, non_blocking=True)
            for s in range(0, len(questions), cfg.questions_per_batch):
                chunk = questions[s : s + cfg.questions_per_batch]
                ids, mask = tokenize_questions(tokenizer, [q for _, q, _ in chunk], cfg.max_tokens, cfg.question_sep)
                index = torch.tensor([i for i, _, _ in chunk], device=device)
                ranking = rank_questions(
                    model, images, index, ids.to(device), mask.to(device), answer_ids, answer_mask, cfg.k_test
                )
                best = ranking.topk_ids[:, 0].tolist()
                for (_, _, label), a in zip(chunk, best):
                    local.append((str(label["question_id"]), answer_list[a], list(label.get("human_answers") or [])))
            images_seen += len(batch["captions"])
            bad += sum(batch.get("bad_samples", {}).values())
    finally:
        model.train(was_training)
    gathered = all_gather_objects((local, images_seen, bad), world_size)
    answered = sorted((q for part, _, _ in gathered for q in part), key=lambda r: _id_key(r[0]))
    if not answered:
        raise ValueError(f"{data}: no question was answered (empty split?)")
    scored = [(pred, human) for _, pred, human in answered if human]
    accuracy = vqa_accuracy([p for p, _ in scored], [h for _, h in scored]) if scored else None
    majority = majority_baseline([h for _, h in scored]) if scored else (None, None)
    return {
        "results": [result_entry(q, pred) for q, pred, _ in answered],
        "accuracy": accuracy,
        "majority_answer": majority[0],
        "majority_accuracy": majority[1],
        "num_questions": len(answered),
        "num_scored": len(scored),
        "num_images": sum(n for _, n, _ in gathered),
        "bad_samples": sum(b for _, _, b in gathered),
        "timings": {"eval_s": time.perf_counter() - t0},
    }


def majority_baseline(data_answers: Sequence[Sequence[str]]) -> tuple[str, float]:
    """The single answer that scores best on these questions and its VQA accuracy (the floor a model must
    beat): the most frequent human answer, scored with the official metric."""
    counts: dict[str, int] = {}
    for human in data_answers:
        for a in human:
            counts[a] = counts.get(a, 0) + 1
    answer = max(sorted(counts), key=counts.__getitem__)
    return answer, vqa_accuracy([answer] * len(data_answers), data_answers)


def _id_key(question_id: str) -> tuple[int, str]:
    return (int(question_id), "") if question_id.isdigit() else (-1, question_id)
