"""A learnable synthetic NLVR2: pairs of coloured-shape images with a true or false sentence about the pair.

Every image pair gets `per_pair` true and `per_pair` false sentences from the same templates, so the
sentence alone says nothing about the label (chance is 50%) and a model beating it reads both images:
- "the left image contains something {color}" / "... right image ..." (true: that image shows the
  colour; false: it does not);
- "both images contain something {color}" (true: both show it; false: at most one does);
- "the left image shows a {shape}" / "... right image ..." (shapes instead of colours).
To make "both" claims possible, a third of the right images repeat a colour of their left image.
Images are data_prep.synthetic scenes; deterministic from a seed; splits use disjoint images.

Written layout (root = `out_dir`), as the NLVR2 release unpacks (train images in numbered folders):
    images/<split>/[<directory>/]<split>-<set>-0-img{0,1}.png
    <split>.json     JSON lines {"identifier": "<split>-<set>-0-<n>", "sentence", "label": "True"|"False",
                     ["directory"]} (the release's keys; urls/writer omitted)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from data_prep.synthetic import COLORS, SHAPES, Shape, _sample_scene, render

TRAIN_DIRECTORIES = 3  # train images are spread over images/train/0..2 as the release's train/0..99


@dataclass(frozen=True)
class SyntheticNLVR:
    root: Path
    image_root: Path
    jsonl: dict[str, Path]  # split -> <split>.json (JSON lines)
    records: dict[str, int]  # split -> number of (pair, sentence) records
    true_records: dict[str, int]  # split -> records labelled "True"


def _facts(scene: tuple[Shape, ...]) -> tuple[set[str], set[str]]:
    return {c for c, *_ in scene}, {s for _, s, *_ in scene}


def _claims(left: tuple[Shape, ...], right: tuple[Shape, ...], rng: random.Random) -> list[tuple[str, bool]]:
    """One true and one false sentence about (left, right), from one template."""
    (lc, ls), (rc, rs) = _facts(left), _facts(right)
    side = rng.choice(("left", "right"))
    colours, shapes = (lc, ls) if side == "left" else (rc, rs)
    kind = rng.choices(("colour", "both", "shape"), weights=(2, 1, 1))[0]
    if kind == "both" and lc & rc:
        yes = rng.choice(sorted(lc & rc))
        no = rng.choice(sorted(set(COLORS) - (lc & rc)))
        template = "both images contain something {}"
    elif kind == "shape":
        yes, no = rng.choice(sorted(shapes)), rng.choice(sorted(set(SHAPES) - shapes))
        template = f"the {side} image shows a {{}}"
    else:
        yes, no = rng.choice(sorted(colours)), rng.choice(sorted(set(COLORS) - colours))
        template = f"the {side} image contains something {{}}"
    return [(template.format(yes), True), (template.format(no), False)]


def _right_scene(left: tuple[Shape, ...], rng: random.Random) -> tuple[Shape, ...]:
    scene = _sample_scene(rng)
    if rng.random() < 1 / 3:  # share a colour with the left image, so "both" claims can be true
        colour = rng.choice(sorted(_facts(left)[0]))
        scene = ((colour, *scene[0][1:]),) + scene[1:]
    return scene


def write_synthetic_nlvr(
    out_dir: str | Path, *, splits: dict[str, int], seed: int = 0, image_size: int = 64, per_pair: int = 1
) -> SyntheticNLVR:
    """Generate `splits` ({split: number of image pairs}) under `out_dir`; deterministic in `seed`."""
    root = Path(out_dir)
    image_root = root / "images"
    rng = random.Random(seed)
    jsonl: dict[str, Path] = {}
    counts: dict[str, int] = {}
    trues: dict[str, int] = {}
    for split, n in splits.items():
        lines = []
        for set_id in range(n):
            left = _sample_scene(rng)
            right = _right_scene(left, rng)
            directory = set_id % TRAIN_DIRECTORIES if split == "train" else None
            folder = image_root / split / ("" if directory is None else str(directory))
            folder.mkdir(parents=True, exist_ok=True)
            for k, scene in enumerate((left, right)):
                stem = f"{split}-{set_id}-0-img{k}"
                render(scene, image_size, random.Random(f"{seed}/{stem}")).save(folder / f"{stem}.png")
            claims = [c for _ in range(per_pair) for c in _claims(left, right, rng)]
            rng.shuffle(claims)
            for s, (sentence, truth) in enumerate(claims):
                record = {"identifier": f"{split}-{set_id}-0-{s}", "sentence": sentence, "label": str(truth)}
                if directory is not None:
                    record["directory"] = directory
                lines.append(record)
        jsonl[split] = root / f"{split}.json"
        jsonl[split].write_text("".join(json.dumps(line) + "\n" for line in lines))
        counts[split] = len(lines)
        trues[split] = sum(r["label"] == "True" for r in lines)
    return SyntheticNLVR(root, image_root, jsonl, counts, trues)
