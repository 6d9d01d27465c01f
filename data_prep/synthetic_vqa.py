"""A learnable synthetic VQA v2: coloured-shape images with questions the pixels answer.

The images are data_prep.synthetic scenes (one or two shapes); each gets `per_image` questions drawn
from four kinds, phrased with varied templates:
- colour: "what color is the {shape}?" -> the colour of that shape (6 answers);
- shape: "what shape is the {color} one?" -> the shape of that colour (5 answers);
- yes/no: "is there a {color} {shape}?" -> yes for a shape in the picture, no for one that is not;
- count: "how many shapes are there?" -> "1" or "2".
Every answer needs the image (the question names what to look at, never the answer), so a model
beating the majority answer grounds the words. Each question has 10 human answers: mostly the right
one, sometimes one or two annotators give another plausible answer (so weights and the 10-choose-9
accuracy are exercised). Deterministic from a seed; splits use disjoint images.

Written layout (root = `out_dir`), as the VQA v2 release with COCO images:
    images/COCO_<subtype>_<id:012d>.jpg               the images of every split
    v2_OpenEnded_mscoco_<subtype>_questions.json      {"data_subtype", "questions": [...]}
    v2_mscoco_<subtype>_annotations.json              {"annotations": [...]} (splits with answers)
with subtype = f"{split}2014" (`prep vqa --input QUESTIONS --annotations ANNOTATIONS --image_root images`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from data_prep.synthetic import COLORS, SHAPES, _sample_scene, render

COLOR_Q = ("what color is the {shape}?", "what is the color of the {shape}?", "which colour does the {shape} have?")
SHAPE_Q = ("what shape is the {color} one?", "what is the {color} shape?", "which shape is {color}?")
YESNO_Q = ("is there a {color} {shape}?", "is there a {color} {shape} in the picture?", "do you see a {color} {shape}?")
COUNT_Q = ("how many shapes are there?", "how many objects are in the picture?")
HUMANS = 10  # human answers per question, as VQA v2


@dataclass(frozen=True)
class SyntheticVQA:
    root: Path
    image_root: Path
    questions: dict[str, Path]  # split -> questions json
    annotations: dict[str, Path]  # split -> annotations json (splits with answers only)
    num_questions: dict[str, int]
    answers: dict[str, list[list[str]]]  # split -> human answers per question (questions file order)


def _qa(scene: tuple, rng: random.Random) -> tuple[str, str]:
    """One (question, right answer) about `scene`."""
    color, shape = rng.choice([(c, s) for c, s, *_ in scene])
    kind = rng.choice(("color", "shape", "yesno", "count"))
    # In a two-shape scene, two shapes of one colour (or one shape) make the question ambiguous: ask another.
    if kind == "color" and sum(s == shape for _, s, *_ in scene) == 1:
        return rng.choice(COLOR_Q).format(shape=shape), color
    if kind == "shape" and sum(c == color for c, *_ in scene) == 1:
        return rng.choice(SHAPE_Q).format(color=color), shape
    if kind == "yesno":
        if rng.random() < 0.5:
            return rng.choice(YESNO_Q).format(color=color, shape=shape), "yes"
        present = {(c, s) for c, s, *_ in scene}
        absent = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        return rng.choice(YESNO_Q).format(color=absent[0], shape=absent[1]), "no"
    return rng.choice(COUNT_Q), str(len(scene))


def _humans(answer: str, rng: random.Random) -> list[str]:
    """10 human answers: the right one, with 0-2 annotators giving a plausible other answer."""
    pool = {"yes": ["no"], "no": ["yes"], "1": ["2"], "2": ["1", "3"]}.get(answer) or (
        [c for c in COLORS if c != answer] if answer in COLORS else [s for s in SHAPES if s != answer]
    )
    others = [rng.choice(pool) for _ in range(rng.choice((0, 0, 1, 2)))]
    out = [answer] * (HUMANS - len(others)) + others
    rng.shuffle(out)
    return out


def write_synthetic_vqa(
    out_dir: str | Path,
    *,
    splits: dict[str, int],
    seed: int = 0,
    image_size: int = 64,
    per_image: int = 3,
    no_answers: tuple[str, ...] = (),
) -> SyntheticVQA:
    """Generate `splits` ({split: number of images}) under `out_dir`; deterministic in `seed`. Splits in
    `no_answers` get a questions file only (like VQA v2 test)."""
    root = Path(out_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    next_image, next_question = 1, 1
    questions: dict[str, Path] = {}
    annotations: dict[str, Path] = {}
    counts: dict[str, int] = {}
    answers: dict[str, list[list[str]]] = {}
    for split, n in splits.items():
        subtype = f"{split}2014"
        qs, anns, humans = [], [], []
        for _ in range(n):
            image_id, next_image = next_image, next_image + 1
            scene = _sample_scene(rng)
            image = render(scene, image_size, random.Random(f"{seed}/{image_id}"))
            image.save(images / f"COCO_{subtype}_{image_id:012d}.jpg", quality=92)
            for _ in range(per_image):
                question, answer = _qa(scene, rng)
                human = _humans(answer, rng)
                qs.append({"image_id": image_id, "question": question, "question_id": next_question})
                anns.append(
                    {
                        "question_id": next_question,
                        "image_id": image_id,
                        "multiple_choice_answer": answer,
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(human)
                        ],  # fmt: skip
                    }
                )
                humans.append(human)
                next_question += 1
        questions[split] = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        questions[split].write_text(json.dumps({"data_subtype": subtype, "questions": qs}))
        if split not in no_answers:
            annotations[split] = root / f"v2_mscoco_{subtype}_annotations.json"
            annotations[split].write_text(json.dumps({"data_subtype": subtype, "annotations": anns}))
        counts[split] = len(qs)
        answers[split] = humans
    return SyntheticVQA(root, images, questions, annotations, counts, answers)
