"""VQA v2 (and ALBEF's Visual Genome QA): questions about COCO / VG images, 10 human answers each.

Input, one record per question, either
- the VQA v2 release: `--input v2_OpenEnded_mscoco_<subtype>_questions.json` ({"data_subtype",
  "questions": [{"image_id", "question", "question_id"}]}) and, for the splits that have answers,
  `--annotations v2_mscoco_<subtype>_annotations.json` ({"annotations": [{"question_id",
  "answers": [{"answer", ...}] x 10, ...}]}); the images are COCO files
  `--image_root/COCO_<subtype>_<image_id:012d>.jpg` (test-dev2015 questions use the test2015 images); or
- the official ALBEF `vqa_train.json` / `vqa_val.json` / `vg_qa.json` / `vqa_test.json`: a JSON list of
  {"question_id", "question", "answer" (a list of human answers; one string for 'vg'), "image" (a path
  relative to --image_root, e.g. "train2014/COCO_train2014_000000000009.jpg"), "dataset" ('vqa' | 'vg')}.
  Prepare vg_qa.json in its own run with --image_root at the VG images (VQA.py's vg_root).

Output: one sample per image whose json carries `captions` = its questions (raw; the loader cleans
them with pre_caption, as the official pre_question) and `labels` = one object per question,
aligned: {"question_id", "answers" (unique, first-seen order), "weights", "human_answers"}. The weights
are the official dataset's: each human answer adds 1/len(answers) (float64 sums: 'running' x 7 of 10
-> 0.7), and a 'vg' answer weighs 0.5; `human_answers` keeps the raw list for the VQA accuracy. A split
where no record has an answer (test, test-dev) is written without answers (empty lists).

Skipped and counted: an empty question (`empty_caption`); in a split with answers, a record without
any (`missing_answer`); a 'dataset' other than vqa/vg (`bad_dataset`); a native question with no
annotation (`missing_annotation`); an image outside --image_root (`outside_image_root`, with all its
questions). `input_rows` counts questions.

Candidate answers (`answer_list.json` beside the shards, written by `write_answer_list`): the
official answer_list.json given with --answer_list (copied), else the --num_answers most frequent
human answers of this split (each human answer counts once; ties alphabetical), else (a split without
answers) none.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError
from data_prep.image_root import ImageRoot
from data_prep.manifest import write_json_atomic
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows
from data_prep.sources._json import load_json

ANSWER_LIST = "answer_list.json"  # beside manifest.json in the prep folder
VG_WEIGHT = 0.5  # official vqa_dataset: a Visual Genome answer weighs 0.5
DATASETS = ("vqa", "vg")
# VQA v2 subtypes whose images live under another subtype's file names
_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}


@dataclass(slots=True)
class Question:
    """One question record, read from either layout."""

    where: str  # "file: entry N" / "file: question N"
    image_name: str  # relative to --image_root
    image_id: str
    question: str
    question_id: str
    answers: list[str] | None  # human answers; None in a split without answers
    dataset: str  # "vqa" | "vg"


def answer_weights(answers: list[str], dataset: str) -> tuple[list[str], list[float]]:
    """Unique answers (first-seen order) and their weights as the official `vqa_dataset` computes them."""
    if dataset == "vg":
        unique = list(dict.fromkeys(answers))
        return unique, [VG_WEIGHT] * len(unique)
    weights: dict[str, float] = {}
    for answer in answers:
        weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.image_root is not None  # parse_options requires it for vqa
    root = ImageRoot(opts.image_root)
    collector = RowCollector()
    questions = list(_native(path, opts, collector) if opts.annotations or _is_native(path) else _albef(path))
    with_answers = any(q.answers for q in questions)
    # image name -> (image id, first where, questions, labels)
    grouped: dict[str, tuple[str, str, list[str], list[dict[str, Any]]]] = {}
    for q in questions:
        reason = None
        if not q.question.strip():
            reason = "empty_caption"
        elif q.dataset not in DATASETS:
            reason = "bad_dataset"
        elif with_answers and not q.answers:
            reason = "missing_answer"
        if reason is not None:
            collector.skip(reason, q.where)
            continue
        human = list(q.answers or [])
        unique, weights = answer_weights(human, q.dataset) if human else ([], [])
        label = {"question_id": q.question_id, "answers": unique, "weights": weights, "human_answers": human}
        entry = grouped.setdefault(q.image_name, (q.image_id, q.where, [], []))
        entry[2].append(q.question.strip())
        entry[3].append(label)
    for name, (image_id, where, texts, labels) in grouped.items():
        collector.add_named(root, name, texts, image_id, where=where, extra={"labels": labels})
    result = collector.result()
    # input_rows counts the native question records, not the grouped images.
    result.input_rows = len(questions) + result.skipped.get("missing_annotation", 0)
    return result


def _is_native(path: Path) -> bool:
    """A VQA v2 questions file is an object with "questions"; ALBEF's json is a list."""
    if not path.is_file():
        return False  # load_json names the missing --input
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"{"


def _text(value: Any, what: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PrepInputError(where, f"{what} must be a string or an integer, got {value!r}")
    return str(value)


def _answers(value: Any, where: str) -> list[str] | None:
    """Human answers as strings: a list of strings, a native list of {"answer"}, or one string."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value.strip()] if value.strip() else None
    if not isinstance(value, list):
        raise PrepInputError(where, f"answers must be a list or a string, got {type(value).__name__}")
    out = []
    for a in value:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, str):
            raise PrepInputError(where, f"an answer must be a string, got {a!r}")
        out.append(a.strip())
    return out or None


def _albef(path: Path) -> Iterator[Question]:
    data = load_json(path, "--input (ALBEF vqa json)")
    if not isinstance(data, list):
        raise PrepInputError(str(path), f"expected a list of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(record, dict):
            raise PrepInputError(where, f"expected an object, got {type(record).__name__}")
        missing = [k for k in ("question", "image") if k not in record]
        if missing:
            raise PrepInputError(where, f"missing key(s) {missing}; expected question, image[, answer, question_id]")
        image = _text(record["image"], "image", where)
        question_id = _text(record.get("question_id", f"{Path(image).stem}#{i}"), "question_id", where)
        question = record["question"] if isinstance(record["question"], str) else ""
        dataset = str(record.get("dataset", "vqa"))
        answers = _answers(record.get("answer"), where)
        yield Question(where, image, image.rsplit(".", 1)[0], question, question_id, answers, dataset)


def _native(path: Path, opts: PrepOptions, collector: RowCollector) -> Iterator[Question]:
    data = load_json(path, "--input (VQA v2 questions json)")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise PrepInputError(str(path), "expected a VQA v2 questions file: an object with a 'questions' list")
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise PrepInputError(
            str(path), "the questions file has no 'data_subtype' (e.g. train2014): image names need it"
        )
    image_subtype = _IMAGE_SUBTYPE.get(subtype, subtype)
    answers = _native_answers(Path(opts.annotations)) if opts.annotations else None
    for i, record in enumerate(data["questions"]):
        where = f"{path}: question {i}"
        if not isinstance(record, dict) or any(k not in record for k in ("image_id", "question", "question_id")):
            raise PrepInputError(where, "expected an object with image_id, question, question_id")
        image_id = _text(record["image_id"], "image_id", where)
        if not image_id.isdigit():
            raise PrepInputError(where, f"a COCO image_id is a number, got {image_id!r}")
        question_id = _text(record["question_id"], "question_id", where)
        human = None
        if answers is not None:
            if question_id not in answers:
                collector.skip("missing_annotation", where)
                continue
            human = answers[question_id]
        name = f"COCO_{image_subtype}_{int(image_id):012d}.jpg"
        question = record["question"] if isinstance(record["question"], str) else ""
        yield Question(where, name, image_id, question, question_id, human, "vqa")


def _native_answers(path: Path) -> dict[str, list[str]]:
    """question_id -> its human answers, from a VQA v2 annotations file."""
    data = load_json(path, "--annotations (VQA v2 annotations json)")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PrepInputError(str(path), "expected a VQA v2 annotations file: an object with an 'annotations' list")
    out: dict[str, list[str]] = {}
    for i, record in enumerate(data["annotations"]):
        where = f"{path}: annotation {i}"
        if not isinstance(record, dict) or "question_id" not in record or "answers" not in record:
            raise PrepInputError(where, "expected an object with question_id and answers")
        out[_text(record["question_id"], "question_id", where)] = _answers(record["answers"], where) or []
    return out


def build_answer_list(rows: SourceRows, num_answers: int) -> list[str]:
    """The `num_answers` most frequent human answers of the rows (each counts once; ties alphabetical)."""
    counts: collections.Counter[str] = collections.Counter()
    for row in rows.rows:
        for label in (row.extra or {}).get("labels", []):
            counts.update(label["human_answers"])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [answer for answer, _ in ranked[:num_answers]]


def write_answer_list(rows: SourceRows, opts: PrepOptions, out_dir: Path) -> Path | None:
    """Write OUT/answer_list.json (atomic): the official list when --answer_list is given, else the
    --num_answers most frequent answers of this split; None (nothing written) for a split without answers."""
    if opts.answer_list is not None:
        answers = load_json(Path(opts.answer_list), "--answer_list (official answer_list.json)")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise PrepInputError(opts.answer_list, "expected a non-empty JSON list of answer strings")
    else:
        answers = build_answer_list(rows, opts.num_answers)
        if not answers:
            return None
    path = out_dir / ANSWER_LIST
    write_json_atomic(path, answers)
    return path
