"""A learnable synthetic NLVR2: pairs of coloured pictures with a true or false sentence about the pair.

Each picture is a field of one colour (jittered per pixel) with a small light or dark shape on it.
Every image pair gets `per_pair` true and `per_pair` false sentences from the same template, so the
sentence alone says nothing about the label (chance is 50%) and a model beating it reads the images:
- "the left image is {colour}" and variants / the same for the right image (true: that picture's colour);
- "both images are {colour}" and variants (true: both pictures have it; false: at most one has);
a third of the right pictures repeat the left one's colour, so "both" claims can be true. Colour fields
rather than data_prep.synthetic's small shapes on a light background: a tiny model trained from random
weights for a few hundred CPU steps (the slow test) learns to compare a colour word with a colour field
(~75% after ~200 steps of batch 32 on the "left/right" claims), not yet with a few pixels of a shape.

Each picture also gets single-image captions (`image_captions`: its colour and shape), the image-text
data the text-assignment pretraining trains on in tests. Deterministic from a seed; splits use disjoint
pictures.

Written layout (root = `out_dir`), as the NLVR2 release unpacks (train images in numbered folders):
    images/<split>/[<directory>/]<split>-<set>-0-img{0,1}.png
    <split>.json     JSON lines {"identifier": "<split>-<set>-0-<n>", "sentence", "label": "True"|"False",
                     ["directory"]} (the release's keys; urls/writer omitted)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from data_prep.synthetic import COLORS, SHAPES

TRAIN_DIRECTORIES = 3  # train images are spread over images/train/0..2 as the release's train/0..99
SIDE = {
    "left": ("the left image is {}", "the picture on the left is mostly {}", "the left image has a {} background"),
    "right": ("the right image is {}", "the picture on the right is mostly {}", "the right image has a {} background"),
}
BOTH = ("both images are {}", "the two pictures are both {}", "each image has a {} background")
CAPTIONS = ("a {c} picture", "a {s} on a {c} background", "an image that is mostly {c} with a small {s}")


@dataclass(frozen=True)
class SyntheticNLVR:
    root: Path
    image_root: Path
    jsonl: dict[str, Path]  # split -> <split>.json (JSON lines)
    records: dict[str, int]  # split -> number of (pair, sentence) records
    true_records: dict[str, int]  # split -> records labelled "True"
    # split -> [(image path, captions)]: single-image captions of every picture (text-assignment data)
    image_captions: dict[str, list[tuple[Path, tuple[str, ...]]]] = field(default_factory=dict)


def render_field(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A field of `colour` (+-20 per channel and pixel block) with a small light or dark `shape` on it."""
    base = COLORS[colour]
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    block = max(1, size // 16)
    for y in range(0, size, block):
        for x in range(0, size, block):
            fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in base)
            draw.rectangle([x, y, x + block - 1, y + block - 1], fill=fill)
    r = size * rng.uniform(0.08, 0.14)
    cx, cy = size * rng.uniform(0.25, 0.75), size * rng.uniform(0.25, 0.75)
    ink = (245, 245, 245) if rng.random() < 0.5 else (20, 20, 20)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=ink)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=ink)
    else:  # square, cross (drawn as a square at this size)
        draw.rectangle(box, fill=ink)
    return image


def _claims(left: str, right: str, rng: random.Random) -> list[tuple[str, bool]]:
    """One true and one false sentence about pictures of colours (left, right), from one template."""
    colours = sorted(COLORS)
    if left == right and rng.random() < 0.5:
        template = rng.choice(BOTH)
        return [(template.format(left), True), (template.format(rng.choice([c for c in colours if c != left])), False)]
    side = rng.choice(("left", "right"))
    colour = left if side == "left" else right
    template = rng.choice(SIDE[side])
    return [(template.format(colour), True), (template.format(rng.choice([c for c in colours if c != colour])), False)]


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
    captions: dict[str, list[tuple[Path, tuple[str, ...]]]] = {}
    for split, n in splits.items():
        lines = []
        captions[split] = []
        for set_id in range(n):
            left = rng.choice(sorted(COLORS))
            right = left if rng.random() < 1 / 3 else rng.choice(sorted(COLORS))
            directory = set_id % TRAIN_DIRECTORIES if split == "train" else None
            folder = image_root / split / ("" if directory is None else str(directory))
            folder.mkdir(parents=True, exist_ok=True)
            for k, colour in enumerate((left, right)):
                shape = rng.choice(SHAPES)
                path = folder / f"{split}-{set_id}-0-img{k}.png"
                render_field(colour, shape, image_size, random.Random(f"{seed}/{path.name}")).save(path)
                captions[split].append((path, tuple(t.format(c=colour, s=shape) for t in CAPTIONS)))
            claims = [c for _ in range(per_pair) for c in _claims(left, right, rng)]
            rng.shuffle(claims)
            for s, (sentence, truth) in enumerate(claims):
                record: dict[str, object] = {"identifier": f"{split}-{set_id}-0-{s}", "sentence": sentence}
                record["label"] = str(truth)
                if directory is not None:
                    record["directory"] = directory
                lines.append(record)
        jsonl[split] = root / f"{split}.json"
        jsonl[split].write_text("".join(json.dumps(line) + "\n" for line in lines))
        counts[split] = len(lines)
        trues[split] = sum(r["label"] == "True" for r in lines)
    return SyntheticNLVR(root, image_root, jsonl, counts, trues, captions)
