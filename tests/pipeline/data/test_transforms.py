"""ALBEF transforms: shapes, normalisation, determinism, op semantics, draft decoding."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from pipeline.data.transforms import (
    ALBEF_AUGS,
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    RandAugment,
    TrainTransform,
    autocontrast,
    build_train_transform,
    equalize,
    normalize_images,
    open_image,
    random_resized_crop_box,
    sharpen,
)


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _smooth_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / 23), 127 + 100 * np.cos(y / 17), 127 + 60 * np.sin((x + y) / 31)], -1)
    return arr.clip(0, 255).astype(np.uint8)


def _noise(h: int, w: int, lo: int = 20, hi: int = 230) -> np.ndarray:
    return np.random.default_rng(0).integers(lo, hi, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("finetune", [False, True])
def test_train_transform_shape_and_determinism(finetune: bool) -> None:
    data = _jpeg(_smooth_image(60, 80))
    t = build_train_transform(32, finetune=finetune)
    a = t(open_image(data), random.Random(1))
    b = t(open_image(data), random.Random(1))
    c = t(open_image(data), random.Random(2))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert t.scale == ((0.5, 1.0) if finetune else (0.2, 1.0))


def test_normalize_images_is_totensor_plus_clip_normalize() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    out = normalize_images(images)
    assert out.dtype == torch.float32 and (out - expected).abs().max() < 1e-5


def test_eval_transform_resizes_whole_image() -> None:
    arr = np.zeros((40, 50, 3), np.uint8)
    arr[:, 25:] = 255  # left half black, right half white: a full-image resize keeps the split
    out = EvalTransform(16)(open_image(_jpeg(arr)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[:, :, :6].float().mean() < 10 and out[:, :, 10:].float().mean() > 245


def test_grayscale_and_png_inputs_become_rgb() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20), 200, np.uint8), mode="L").save(buf, "PNG")
    out = EvalTransform(8)(open_image(buf.getvalue()))
    assert out.shape == (3, 8, 8) and (out == 200).all()


def test_draft_decode_matches_full_decode() -> None:
    data = _jpeg(_smooth_image(512, 640))
    img = open_image(data)
    img.draft("RGB", (64, 48))
    assert img.size[0] < 640  # libjpeg can reduce this image: the fast path is exercised
    fast = EvalTransform(64, draft=True)(open_image(data)).float()
    full = EvalTransform(64, draft=False)(open_image(data)).float()
    assert not torch.equal(fast, full)
    diff = (fast - full).abs()  # grey levels
    assert diff.mean() < 2.0 and diff.max() < 25.0


def test_random_resized_crop_box_bounds() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(80, 60, (0.2, 1.0), rng)
        assert 0 <= left and 0 <= top and left + w <= 80 and top + h <= 60
        assert 0.2 * 0.8 <= w * h / (80 * 60) <= 1.0  # rounding slack below the minimum scale


def test_point_ops_match_pil() -> None:
    arr = _noise(24, 30)
    pil = Image.fromarray(arr)
    assert np.array_equal(equalize(arr), np.array(ImageOps.equalize(pil)))
    assert np.abs(autocontrast(arr).astype(int) - np.array(ImageOps.autocontrast(pil)).astype(int)).max() <= 1
    ours = sharpen(arr, 1.36)[1:-1, 1:-1].astype(int)
    theirs = np.array(ImageEnhance.Sharpness(pil).enhance(1.36))[1:-1, 1:-1].astype(int)
    assert np.abs(ours - theirs).max() <= 2


def test_randaugment_translate_is_seven_pixels_with_grey_fill() -> None:
    img = np.full((32, 32, 3), 10, np.uint8)
    out = RandAugment(num_ops=1, ops=("TranslateX",), prob=1.0)(img, random.Random(0))
    grey_cols = [c for c in range(32) if (out[:, c] == 128).all()]
    assert grey_cols in (list(range(7)), list(range(25, 32)))


def test_randaugment_brightness_uses_official_floor_lut() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    out = RandAugment(num_ops=1, ops=("Brightness",), prob=1.0)(arr, random.Random(0))
    expected = np.clip(np.arange(256) * 1.36, 0, 255).astype(np.uint8).reshape(16, 16)
    assert np.array_equal(out[..., 0], expected)


@pytest.mark.parametrize("op", ALBEF_AUGS)
def test_every_op_keeps_shape_and_dtype(op: str) -> None:
    img = _noise(24, 30)  # not full-range, not smooth: every op but Identity changes it
    out = RandAugment(num_ops=1, ops=(op,), prob=1.0)(img, random.Random(3))
    assert out.shape == (24, 30, 3) and out.dtype == np.uint8
    assert (op == "Identity") == np.array_equal(out, img)


def test_randaugment_skips_ops_with_probability_half() -> None:
    img = _smooth_image(24, 24)
    aug = RandAugment(num_ops=1, ops=("Rotate",))
    changed = sum(not np.array_equal(aug(img, random.Random(s)), img) for s in range(200))
    assert 70 < changed < 130


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (the IHDR is patched, CRC fixed)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[start : start + 17])) & 0xFFFFFFFF
    data[start + 17 : start + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_refused_on_its_header() -> None:
    from collections import Counter

    from pipeline.data.stages import SkipCounter, _decode_image
    from pipeline.data.transforms import MAX_PIXELS, TooManyPixels, open_image

    bomb = _png_declaring(30000, 30000)
    assert len(bomb) < 1000
    with pytest.raises(TooManyPixels):
        open_image(bomb)
    assert open_image(_png_declaring(4, 4), max_pixels=16).size == (4, 4)
    with pytest.raises(TooManyPixels):
        open_image(_png_declaring(5, 4), max_pixels=16)
    counter = SkipCounter()
    sample = {"__url__": "shard.tar", "__key__": "k"}
    assert _decode_image(bomb, lambda img, rng: img.load(), None, counter, sample) is None
    assert Counter(counter.take()) == Counter({"too_many_pixels": 1}) and MAX_PIXELS == 89_478_485


def test_opencv_upscale_matches_pil_bicubic() -> None:
    """Enlarged crops (the usual case near the stored size) go through OpenCV's bicubic: the same image
    as PIL's up to the kernel constant (a few grey levels on a smooth image), the same statistics."""
    from pipeline.data.transforms import decode_region

    arr = _smooth_image(256, 256)
    rng = random.Random(0)
    diffs = []
    for _ in range(20):
        box = random_resized_crop_box(256, 256, (0.2, 1.0), rng)
        img = Image.fromarray(arr)
        fast = decode_region(img, box, 224, draft=False, resize="cv2_upscale").astype(np.float32)
        ref = decode_region(img, box, 224, draft=False, resize="pil").astype(np.float32)
        assert fast.shape == ref.shape == (224, 224, 3)
        diffs.append(np.abs(fast - ref).mean())
        assert abs(fast.mean() - ref.mean()) < 1.0 and abs(fast.std() - ref.std()) < 1.5
    assert max(diffs) < 2.5, diffs


def test_shrinking_crops_keep_pils_antialiased_resize() -> None:
    from pipeline.data.transforms import decode_region

    img = Image.fromarray(_noise(300, 300))
    box = (10, 20, 200, 180)  # larger than the output: OpenCV's bicubic would alias
    fast = decode_region(img, box, 64, draft=False, resize="cv2_upscale")
    assert np.array_equal(fast, decode_region(img, box, 64, draft=False, resize="pil"))


def test_train_transform_default_is_the_fast_resize() -> None:
    data = _jpeg(_smooth_image(128, 160))
    fast = build_train_transform(96)(open_image(data), random.Random(3))
    ref = build_train_transform(96, resize="pil")(open_image(data), random.Random(3))
    assert fast.shape == ref.shape == (3, 96, 96) and fast.dtype == torch.uint8
    assert (fast.float() - ref.float()).abs().mean() < 3.0


def test_train_transform_flips_half_the_time_unless_told_not_to() -> None:
    """Whole-image crops and no RandAugment leave the flip as the only change (dark left half, light right)."""
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, 32:] = 255
    img = open_image(_jpeg(arr))

    def mirrored(hflip: bool) -> list[bool]:
        tf = TrainTransform(32, (1.0, 1.0), randaugment=False, hflip=hflip)
        rng = random.Random(0)
        outs = [tf(img, rng).float() for _ in range(40)]
        return [bool(o[:, :, :8].mean() > o[:, :, -8:].mean()) for o in outs]

    assert 5 < sum(mirrored(True)) < 35  # the paper's p = 0.5
    assert not any(mirrored(False))
