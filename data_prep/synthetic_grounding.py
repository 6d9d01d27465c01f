"""A learnable synthetic RefCOCO+: images of several coloured shapes, one referring expression per
shape, its box known exactly, and the shapes' boxes as the detection proposals.

Each image holds `shapes_per_image` shapes of distinct colours and distinct kinds in distinct cells
of a grid, so "the red circle" names exactly one of them; the proposals are all the shape boxes, so
ranking them at random scores 1 / shapes_per_image. Images are not square (the evaluation resizes
them to a square: boxes must stay right in the original frame). Deterministic from a seed.

Written layout (root = `out_dir`), as the official ALBEF grounding release + the native REFER files:
    images/train2014/COCO_train2014_<12-digit id>.jpg   (--image_root = root/images)
    refcoco+_train.json     [{"image", "text"}]             image-text pairs of the train split
    refcoco+_val.json       [{"image", "text", "ref_id"}]   val expressions
    refcoco+_test.json      [{"image", "text", "ref_id"}]   testA + testB expressions
    refs(unc).p             REFER refs (pickle): ref_id, ann_id, image_id, split, sentences, file_name
    instances.json          COCO-style images (width, height, file_name) and annotations (bbox)
    dets.json               {image_id: [[x, y, w, h], ...]} the proposals of every image
    scene_train.json        [{"url", "caption": [..]}] whole-scene captions of the train images ("a red
                            circle, a blue cross and a green square", shapes in shuffled orders): a tiny
                            pretraining corpus (`albef prep generic --image_root root/images`)
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from data_prep.synthetic import COLORS, SHAPES

TEMPLATES = ("the {color} {shape}", "{color} {shape}", "a {color} {shape}", "the {shape} that is {color}")
CELL = 32  # px per grid cell of the original image (before img2dataset's resize)
GRIDS = ((3, 2), (2, 3))  # (columns, rows): landscape and portrait images
SCENE_CAPTIONS = 3  # whole-scene captions per train image (scene_train.json)


@dataclass(frozen=True)
class SyntheticGrounding:
    root: Path
    image_root: Path
    files: dict[str, Path]  # train_json, val_json, test_json, refs, instances, dets
    refs_per_split: dict[str, int] = field(default_factory=dict)  # split -> expressions (= refs here)
    boxes: dict[int, list[float]] = field(default_factory=dict)  # ref_id -> GT [x, y, w, h]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[float], fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([x0, cy - w, x1, cy + w], fill=fill)
        draw.rectangle([cx - w, y0, cx + w, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _scene_captions(rng: random.Random, shapes: list[tuple[str, str, list[float]]], n: int) -> list[str]:
    """`n` captions naming every shape of the scene ("a red circle, a blue cross and a green square"),
    each in a random order."""
    out = []
    for _ in range(n):
        parts = [f"a {color} {shape}" for color, shape, _ in rng.sample(shapes, len(shapes))]
        out.append(parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    return out


def _scene(rng: random.Random, k: int, scale: float) -> tuple[int, int, list[tuple[str, str, list[float]]]]:
    """(width, height, [(colour, shape, [x, y, w, h])]): k shapes in k distinct grid cells."""
    cols, rows = rng.choice(GRIDS)
    cell = CELL * scale
    cells = rng.sample([(c, r) for c in range(cols) for r in range(rows)], k)
    colors, shapes = rng.sample(sorted(COLORS), k), rng.sample(SHAPES, k)
    out = []
    for (c, r), color, shape in zip(cells, colors, shapes):
        side = round(cell * rng.uniform(0.55, 0.8))
        x = round(c * cell + rng.uniform(0, cell - side))
        y = round(r * cell + rng.uniform(0, cell - side))
        out.append((color, shape, [float(x), float(y), float(side), float(side)]))
    return round(cols * cell), round(rows * cell), out


def write_synthetic_grounding(
    out_dir: str | Path,
    *,
    splits: dict[str, int],
    seed: int = 0,
    shapes_per_image: int = 3,
    scale: float = 1.0,
    texts_per_ref: int = 1,
) -> SyntheticGrounding:
    """Generate `splits` ({train|val|testA|testB: number of images}) under `out_dir`.

    `scale` multiplies the 32-px grid cell (scale 2: 192 x 128 images); every ref gets
    `texts_per_ref` expressions (distinct templates).
    """
    if not 1 <= shapes_per_image <= min(len(SHAPES), 6):
        raise ValueError(f"shapes_per_image must be in [1, {min(len(SHAPES), 6)}], got {shapes_per_image}")
    unknown = set(splits) - {"train", "val", "testA", "testB"}
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}")
    root = Path(out_dir)
    image_dir = root / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations, refs, dets = [], [], [], {}
    albef: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    scenes: list[dict] = []
    scene_rng = random.Random(f"scenes-{seed}")  # its own stream: the images and refs do not depend on it
    boxes: dict[int, list[float]] = {}
    counts: dict[str, int] = {}
    image_id, ann_id, ref_id, sent_id = 100, 1000, 0, 0
    for split, n in splits.items():
        for _ in range(n):
            image_id += 1
            width, height, shapes = _scene(rng, shapes_per_image, scale)
            name = f"COCO_train2014_{image_id:012d}.jpg"
            bg = tuple(rng.randint(200, 245) for _ in range(3))
            image = Image.new("RGB", (width, height), bg)
            draw = ImageDraw.Draw(image)
            for color, shape, box in shapes:
                _draw(draw, shape, box, COLORS[color])
            image.save(image_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            dets[str(image_id)] = [box for _, _, box in shapes]
            if split == "train":
                scenes.append(
                    {"url": f"train2014/{name}", "caption": _scene_captions(scene_rng, shapes, SCENE_CAPTIONS)}
                )
            for color, shape, box in shapes:
                ann_id += 1
                ref_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "bbox": box, "category_id": 1})
                texts = [t.format(color=color, shape=shape) for t in rng.sample(TEMPLATES, texts_per_ref)]
                sentences = [{"sent_id": sent_id + i, "raw": t, "sent": t, "tokens": t.split()} for i, t in enumerate(texts)]  # fmt: skip
                sent_id += len(texts)
                refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                             "file_name": name, "category_id": 1, "sentences": sentences,
                             "sent_ids": [s["sent_id"] for s in sentences]})  # fmt: skip
                boxes[ref_id] = box
                group = "test" if split.startswith("test") else split
                for text in texts:
                    entry = {"image": f"train2014/{name}", "text": text}
                    albef[group].append(entry if split == "train" else {**entry, "ref_id": ref_id})
                counts[split] = counts.get(split, 0) + len(texts)
    files = {
        "train_json": root / "refcoco+_train.json",
        "val_json": root / "refcoco+_val.json",
        "test_json": root / "refcoco+_test.json",
        "refs": root / "refs(unc).p",
        "instances": root / "instances.json",
        "dets": root / "dets.json",
        "scene_json": root / "scene_train.json",
    }
    for group in ("train", "val", "test"):
        files[f"{group}_json"].write_text(json.dumps(albef[group]))
    files["refs"].write_bytes(pickle.dumps(refs, protocol=2))
    categories = [{"id": 1, "name": "shape", "supercategory": "shape"}]
    files["instances"].write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    files["dets"].write_text(json.dumps(dets))
    files["scene_json"].write_text(json.dumps(scenes))
    return SyntheticGrounding(root, root / "images", files, counts, boxes)
