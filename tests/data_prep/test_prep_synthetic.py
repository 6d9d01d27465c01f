"""The synthetic shapes set: deterministic, grounded captions, and a truly held-out test split."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from PIL import Image

from data_prep.options import parse_options
from data_prep.sources import READERS
from data_prep.synthetic import COLORS, POSITIONS, SIZES, write_synthetic


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", n_train=20, n_test=6, seed=3, image_size=48)
    b = write_synthetic(tmp_path / "b", n_train=20, n_test=6, seed=3, image_size=48)
    c = write_synthetic(tmp_path / "c", n_train=20, n_test=6, seed=4, image_size=48)
    assert _digest(a.root) == _digest(b.root) and a.images == b.images
    assert [im.captions for im in a.images] != [im.captions for im in c.images]


def test_held_out_split_and_layout(tmp_path: Path) -> None:
    s = write_synthetic(
        tmp_path, n_train=200, n_val=10, n_test=40, seed=0, image_size=64, base_url="http://127.0.0.1:8/"
    )
    train, val, test = s.split("train"), s.split("val"), s.split("test")
    assert (len(train), len(val), len(test)) == (200, 10, 40)
    train_captions = {c for im in train for c in im.captions}
    assert all(c not in train_captions for im in val + test for c in im.captions)
    assert len({im.scene for im in test}) == len(test)  # one right answer per test caption
    assert all(len(im.captions) == 3 == len(set(im.captions)) for im in s.images)
    assert not any(re.search(r"\ba [aeiou]", c) for im in s.images for c in im.captions)  # "an orange"
    for im in s.images:
        with Image.open(s.root / im.relpath) as img:
            assert img.size == (64, 64) and img.format == "JPEG"
    # The native lists read back through the real readers.
    coco = READERS["coco"](s.karpathy_json, parse_options("coco", {"split": "test", "image_root": str(s.root)}))
    assert [r.captions for r in coco.rows] == [list(im.captions) for im in test]
    assert all(Path(r.url.removeprefix("file://")).is_file() for r in coco.rows)
    generic = READERS["generic"](s.generic_lists["train"], parse_options("generic", {"id_col": "image_id"}))
    assert generic.rows[0].url == f"http://127.0.0.1:8/{train[0].relpath}"
    assert [r.image_id for r in generic.rows] == [im.image_id for im in train]
    assert json.loads(s.karpathy_json.read_text())["images"][0]["sentences"][0]["raw"] == train[0].captions[0]


def test_captions_are_grounded_in_pixels(tmp_path: Path) -> None:
    """For one-shape scenes, the pixel at the named position has the named colour."""
    s = write_synthetic(tmp_path, n_train=80, n_test=0, seed=1, image_size=96)
    checked = 0
    for im in s.images:
        if len(im.scene) != 1:
            continue
        color, shape, size, pos = im.scene[0]
        assert all(color in c and shape in c for c in im.captions)
        assert any(size in c for c in im.captions) and SIZES[size] > 0
        x, y = (int(v * 96) for v in POSITIONS[pos])
        with Image.open(s.root / im.relpath) as img:
            pixel = img.convert("RGB").getpixel((x, y))
        nearest = min(COLORS, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLORS[k], pixel)))
        assert nearest == color, (im.relpath, pixel, color)
        checked += 1
    assert checked >= 20
