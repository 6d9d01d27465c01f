"""A learnable synthetic image-caption set: coloured shapes whose captions describe them.

Why not noise: the demo and the end-to-end tests must show retrieval recall rising well above
chance, so every caption word is grounded in the pixels (colour, shape, size, position, and for
two-shape scenes their left/right or top/bottom arrangement), phrased with varied templates.
Deterministic from a seed. The test split is held out: none of its captions occurs in train (a
test image may show a scene seen in training, described in words never seen with it), and no two
test images show the same scene, so retrieval on test has one right answer.

Written layout (root = `out_dir`):
    images/<split>/<split>_NNNNN.jpg
    dataset_synthetic.json   Karpathy-style (coco source: `--image_root <root or base URL>`)
    <split>.json             generic list [{"url", "caption": [..], "image_id"}] if base_url is given
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (235, 205, 35), "purple": (135, 55, 175), "orange": (245, 135, 25),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.2, "large": 0.38}  # shape extent as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
ONE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "{where}, a {size} {color} {shape}",
    "a picture of a {color} {shape}, {size}, {where}",
    "the image shows a {size} {shape} coloured {color} {where}",
)
PAIR_TEMPLATES = {
    "horizontal": (
        "a {c1} {s1} on the left and a {c2} {s2} on the right",
        "a {c1} {s1} to the left of a {c2} {s2}",
        "a {c2} {s2} to the right of a {c1} {s1}",
        "two shapes: a {c1} {s1} on the left, a {c2} {s2} on the right",
    ),
    "vertical": (
        "a {c1} {s1} at the top and a {c2} {s2} at the bottom",
        "a {c1} {s1} above a {c2} {s2}",
        "a {c2} {s2} below a {c1} {s1}",
        "two shapes: a {c1} {s1} at the top, a {c2} {s2} at the bottom",
    ),
}

Shape = tuple[str, str, str, str]  # (colour, shape, size, position)


@dataclass(frozen=True)
class SyntheticImage:
    split: str
    relpath: str  # relative to the set's root, "/"-separated
    image_id: str
    captions: tuple[str, ...]
    scene: tuple[Shape, ...]


@dataclass(frozen=True)
class SyntheticSet:
    root: Path
    karpathy_json: Path
    images: tuple[SyntheticImage, ...]
    generic_lists: dict[str, Path]  # split -> generic json list (only when base_url was given)

    def split(self, name: str) -> list[SyntheticImage]:
        return [im for im in self.images if im.split == name]


def _sample_scene(rng: random.Random) -> tuple[Shape, ...]:
    if rng.random() < 0.5:
        return ((rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),)
    first, second = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    return tuple((rng.choice(list(COLORS)), rng.choice(SHAPES), "small", pos) for pos in (first, second))


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _captions(scene: tuple[Shape, ...], rng: random.Random, k: int) -> tuple[str, ...]:
    return tuple(_articles(c) for c in _raw_captions(scene, rng, k))


def _raw_captions(scene: tuple[Shape, ...], rng: random.Random, k: int) -> tuple[str, ...]:
    if len(scene) == 1:
        color, shape, size, pos = scene[0]
        templates = rng.sample(ONE_TEMPLATES, k)
        return tuple(t.format(size=size, color=color, shape=shape, where=WHERE[pos]) for t in templates)
    (c1, s1, _, p1), (c2, s2, _, _) = scene
    templates = rng.sample(PAIR_TEMPLATES["horizontal" if p1 == "left" else "vertical"], k)
    return tuple(t.format(c1=c1, s1=s1, c2=c2, s2=s2) for t in templates)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def render(scene: tuple[Shape, ...], size: int, rng: random.Random) -> Image.Image:
    """Draw the scene on a light, slightly tinted background, with jittered positions and sizes."""
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for color, shape, extent, pos in scene:
        r = SIZES[extent] * size / 2 * rng.uniform(0.9, 1.1)
        cx = (POSITIONS[pos][0] + rng.uniform(-0.04, 0.04)) * size
        cy = (POSITIONS[pos][1] + rng.uniform(-0.04, 0.04)) * size
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[color])
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "cross":
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def _make_split(
    split: str, n: int, rng: random.Random, captions_per_image: int, forbidden: set[str]
) -> list[SyntheticImage]:
    """n images; with `forbidden` (train captions) no caption may repeat one and scenes are unique."""
    images: list[SyntheticImage] = []
    held_out = bool(forbidden)
    scenes_used: set[tuple[Shape, ...]] = set()
    for _attempt in range(1000 * max(n, 1)):
        if len(images) == n:
            break
        scene = _sample_scene(rng)
        captions = _captions(scene, rng, captions_per_image)
        if held_out and (scene in scenes_used or any(c in forbidden for c in captions)):
            continue
        scenes_used.add(scene)
        i = len(images)
        images.append(SyntheticImage(split, f"images/{split}/{split}_{i:05d}.jpg", f"{split}_{i:05d}", captions, scene))
    if len(images) < n:
        raise ValueError(f"could only make {len(images)} held-out {split} images with unseen captions; ask for fewer")
    return images


def write_synthetic(
    out_dir: str | Path,
    *,
    n_train: int = 512,
    n_test: int = 64,
    n_val: int = 0,
    seed: int = 0,
    image_size: int = 96,
    captions_per_image: int = 3,
    base_url: str | None = None,
) -> SyntheticSet:
    """Generate the set under `out_dir` (JPEGs + Karpathy json [+ generic lists]); deterministic in `seed`.

    Args:
        base_url: where `out_dir` will be served (e.g. FolderServer(out_dir).base_url); when given,
            `<split>.json` generic lists with full URLs are written too.
    """
    if not 1 <= captions_per_image <= 4:
        raise ValueError("captions_per_image must be in 1..4 (the number of pair templates)")
    root = Path(out_dir)
    rng = random.Random(seed)
    train = _make_split("train", n_train, rng, captions_per_image, forbidden=set())
    seen = {c for im in train for c in im.captions}
    held = [_make_split(s, n, rng, captions_per_image, forbidden=seen) for s, n in (("val", n_val), ("test", n_test))]
    images = tuple(train + held[0] + held[1])
    for im in images:
        path = root / im.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        render(im.scene, image_size, random.Random(f"{seed}/{im.image_id}")).save(path, "JPEG", quality=92)
    karpathy = root / "dataset_synthetic.json"
    _write_json(karpathy, {"dataset": "synthetic", "images": [_karpathy_entry(i, im) for i, im in enumerate(images)]})
    lists: dict[str, Path] = {}
    if base_url is not None:
        for split in sorted({im.split for im in images}):
            lists[split] = root / f"{split}.json"
            rows = [{"url": f"{base_url.rstrip('/')}/{im.relpath}", "caption": list(im.captions), "image_id": im.image_id}
                    for im in images if im.split == split]  # fmt: skip
            _write_json(lists[split], rows)
    return SyntheticSet(root=root, karpathy_json=karpathy, images=images, generic_lists=lists)


def _karpathy_entry(index: int, im: SyntheticImage) -> dict:
    filepath, filename = im.relpath.rsplit("/", 1)
    return {
        "filepath": filepath, "filename": filename, "split": im.split, "imgid": index, "cocoid": index,
        "sentences": [{"raw": c, "tokens": c.replace(",", "").replace(":", "").split()} for c in im.captions],
    }  # fmt: skip


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
