"""ALBEF image transforms with JPEG draft decoding and explicit random generators.

Train (DESIGN.md section 3, official `dataset/__init__.py` + `dataset/randaugment.py`):
RandomResizedCrop(res, scale=(0.2, 1.0) pretrain / (0.5, 1.0) fine-tune, bicubic) -> horizontal
flip (p 0.5) -> RandAugment(2 ops, magnitude 7 of 10) over Identity, AutoContrast, Equalize,
Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate -> CLIP mean/std normalisation.
Eval: resize to res x res (aspect not kept, as the official test transform), bicubic, normalise.

Transforms return uint8 [3, res, res] tensors; `normalize_images` turns a whole batch into CLIP-
normalised float32 at once (in the loader's collate, or on the GPU by the trainer): per-sample
float conversion was a third of the loader's CPU time and moves 4x the bytes between processes.

Why not torchvision's classes: they draw from the global torch RNG, and the loader must be a
deterministic function of (seed, step) without touching the trainer's RNG (see pipeline.data).
Every random draw here comes from the `random.Random` the caller passes in.

Why decode here rather than before: the crop box is drawn from the image size in the JPEG header
(known before decoding), so we can ask libjpeg for a 1/2, 1/4 or 1/8-scale DCT decode whenever
the crop still has >= res pixels at that scale (PIL `draft`). Decoding dominates loader CPU time
for large stored images and this cuts it several-fold; the result differs from a full decode only
by the resampling filter (a few grey levels).

RandAugment follows the official op semantics (numpy + OpenCV, like the official code, and ~10x
faster than PIL's generic affine), not torchvision's RandAugment: the 2 ops are drawn with
replacement, each then applied with probability 0.5; Brightness/Sharpness use the fixed factor
1.36 (= 0.1 + 1.8 * 7/10); shears are +-0.21 and rotations +-21 degrees with a random sign;
translations are +-7 *pixels* (the official constant is absolute, not a fraction of the size);
geometric ops fill with grey (128, 128, 128) and interpolate bilinearly; AutoContrast and
Equalize are PIL's per-channel rules.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ALBEF_AUGS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.5, 1.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default aspect range
_FILL = (128, 128, 128)
_LEVELS = np.arange(256, dtype=np.float32)
Resize = Literal["pil", "cv2_upscale"]


# Pixels (width x height) a sample may declare; PIL's own bomb threshold, the same default as
# `albef prep --max_pixels`. Checked on the header, before any pixel is decoded.
MAX_PIXELS = 89_478_485


class TooManyPixels(ValueError):
    """An image whose header declares more than MAX_PIXELS pixels (a decompression bomb)."""


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open encoded image bytes lazily: only the header is parsed, pixels are decoded later.

    Raises TooManyPixels when the header declares more than `max_pixels` pixels, so a small file
    claiming a huge size costs nothing (PIL itself only warns below twice its limit).
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own refusal above twice its limit
        raise TooManyPixels(str(err)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} = {width * height} pixels > {max_pixels}")
    return img


def _per_channel_lut(img: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    lut = np.stack(luts, axis=-1).astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(img, lut)


def autocontrast(img: np.ndarray) -> np.ndarray:
    """PIL ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    flat = img.reshape(1, -1, 3)  # cv2.reduce: ~100x faster than numpy's strided min/max here
    lows = cv2.reduce(flat, 1, cv2.REDUCE_MIN).ravel().tolist()
    highs = cv2.reduce(flat, 1, cv2.REDUCE_MAX).ravel().tolist()
    luts = []
    for lo, hi in zip(lows, highs):
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        luts.append(np.clip(_LEVELS * scale - lo * scale, 0, 255) if hi > lo else _LEVELS)
    return _per_channel_lut(img, luts)


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL ImageOps.equalize: per-channel histogram equalisation with PIL's step rule."""
    luts = []
    for c in range(img.shape[2]):
        hist = cv2.calcHist([img], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        nonzero = hist[hist != 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            luts.append(_LEVELS)
            continue
        shifted = np.concatenate([[step // 2], hist[:-1]])
        luts.append(np.clip(np.cumsum(shifted) // step, 0, 255))
    return _per_channel_lut(img, luts)


def sharpen(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image; borders unchanged."""
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    smooth = cv2.filter2D(img, -1, kernel / 13).astype(np.float32)[1:-1, 1:-1]
    out = img.copy()
    inner = smooth + factor * (img[1:-1, 1:-1].astype(np.float32) - smooth)
    out[1:-1, 1:-1] = np.clip(inner, 0, 255).astype(np.uint8)  # clipped as PIL (official code wraps)
    return out


def _warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=_FILL)


class RandAugment:
    """ALBEF's RandomAugment(N, M) on uint8 HWC RGB arrays with an explicit generator."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 7,
        ops: Sequence[str] = ALBEF_AUGS,
        prob: float = 0.5,
        max_level: int = 10,
        translate_const: float = 10.0,
    ) -> None:
        unknown = sorted(set(ops) - set(ALBEF_AUGS))
        assert not unknown, f"unsupported RandAugment ops: {unknown}"
        assert num_ops >= 0 and 0 <= magnitude <= max_level, (num_ops, magnitude, max_level)
        self.num_ops, self.ops, self.prob = num_ops, tuple(ops), prob
        frac = magnitude / max_level
        self.enhance = frac * 1.8 + 0.1  # official enhance_level_to_args
        self.shear = frac * 0.3
        self.translate = frac * translate_const  # pixels
        self.rotate = frac * 30.0  # degrees
        # Official brightness: uint8(clip(v * factor)), a floor, not PIL's rounded blend.
        self._brightness_lut = np.clip(_LEVELS * self.enhance, 0, 255).astype(np.uint8)

    def __call__(self, img: np.ndarray, rng: random.Random) -> np.ndarray:
        chosen = [rng.choice(self.ops) for _ in range(self.num_ops)]  # with replacement
        for name in chosen:
            if rng.random() > self.prob:
                continue
            img = self._apply(name, img, rng)
        return img

    def _signed(self, value: float, rng: random.Random) -> float:
        return -value if rng.random() > 0.5 else value

    def _apply(self, name: str, img: np.ndarray, rng: random.Random) -> np.ndarray:
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return autocontrast(img)
        if name == "Equalize":
            return equalize(img)
        if name == "Brightness":
            return cv2.LUT(img, self._brightness_lut)
        if name == "Sharpness":
            return sharpen(img, self.enhance)
        if name == "Rotate":  # degrees, counter-clockwise about the centre
            h, w = img.shape[:2]
            return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), self._signed(self.rotate, rng), 1.0))
        # Forward matrices as the official cv2 code (shear about the top-left corner).
        if name == "ShearX":
            m = [[1, self._signed(self.shear, rng), 0], [0, 1, 0]]
        elif name == "ShearY":
            m = [[1, 0, 0], [self._signed(self.shear, rng), 1, 0]]
        elif name == "TranslateX":
            m = [[1, 0, -self._signed(self.translate, rng)], [0, 1, 0]]
        else:  # TranslateY
            m = [[1, 0, 0], [0, 1, -self._signed(self.translate, rng)]]
        return _warp(img, np.asarray(m, np.float32))


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = _RATIO
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with our generator; returns (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_region(
    img: Image.Image, box: tuple[float, float, float, float], res: int, draft: bool, resize: Resize = "pil"
) -> np.ndarray:
    """Decode `img` (lazily opened) and resize the region `box` (l, t, w, h) to res x res, bicubic.

    With `draft`, a JPEG is decoded at the smallest 1/2^k scale that keeps >= res pixels across
    the region in both directions; the box is rescaled to the reduced image.
    resize: "pil" = PIL's bicubic (antialiased when shrinking) on the exact (fractional) box;
    "cv2_upscale" = when the region has at most res pixels across in both directions (always so for
    stored images near the training size: the crop is enlarged), OpenCV's bicubic on the box rounded
    to whole pixels, ~9x cheaper than PIL's and the largest cost of a loader worker after the JPEG
    decode; shrinking regions still go through PIL (OpenCV's bicubic does not antialias).
    Returns uint8 [res, res, 3].
    """
    left, top, w, h = box
    full_w, full_h = img.size
    if draft and img.format == "JPEG":
        img.draft("RGB", (math.ceil(full_w * res / w), math.ceil(full_h * res / h)))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    src = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    if resize == "cv2_upscale" and w * sx <= res and h * sy <= res:
        x0, y0 = round(src[0]), round(src[1])
        x1, y1 = max(round(src[2]), x0 + 1), max(round(src[3]), y0 + 1)
        region = np.asarray(img)[y0:y1, x0:x1]  # [h, w, 3] view of the decoded pixels
        # OpenCV's bicubic (a = -0.75; PIL: -0.5): the same pixel-centre mapping, a slightly sharper kernel
        return cv2.resize(region, (res, res), interpolation=cv2.INTER_CUBIC)
    return np.asarray(img.resize((res, res), Image.Resampling.BICUBIC, box=src))


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HWC array -> uint8 [3, H, W] tensor (a view; batching copies it once)."""
    if not img.flags.writeable:  # np.asarray(PIL image) is read-only; torch wants writable memory
        img = img.copy()
    return torch.from_numpy(img).permute(2, 0, 1)


def limit_threads() -> None:
    """One OpenCV thread per loader worker: workers are the parallelism, nested pools oversubscribe."""
    cv2.setNumThreads(1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD (ToTensor + Normalize).

    Works on any device; call it on the GPU when the loader hands over uint8 batches.
    """
    std = torch.tensor(CLIP_STD, device=images.device).view(3, 1, 1) * 255.0
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(3, 1, 1) * 255.0
    return images.float().sub_(mean).div_(std)


class TrainTransform:
    """Lazily opened image -> augmented uint8 [3, res, res] tensor (ALBEF train pipeline).

    `hflip=False` drops the mirror, which contradicts captions that say "on the left" (measured on the
    synthetic shapes with bench/tiny_learning.py --hflip 0; the stages keep the paper's flip)."""

    def __init__(
        self,
        res: int = 256,
        scale: tuple[float, float] = PRETRAIN_SCALE,
        randaugment: bool = True,
        draft: bool = True,
        resize: Resize = "cv2_upscale",
        hflip: bool = True,
    ) -> None:
        assert res > 0 and 0 < scale[0] <= scale[1] <= 1.0, (res, scale)
        self.res, self.scale, self.draft, self.resize, self.hflip = res, scale, draft, resize, hflip
        self.randaugment = RandAugment() if randaugment else None

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """Returns uint8 [3, res, res]; see `normalize_images`."""
        box = random_resized_crop_box(img.size[0], img.size[1], self.scale, rng)
        out = decode_region(img, box, self.res, self.draft, self.resize)  # [res, res, 3] uint8
        if self.hflip and rng.random() < 0.5:
            out = cv2.flip(out, 1)
        if self.randaugment is not None:
            out = self.randaugment(out, rng)
        return to_chw_tensor(out)


class EvalTransform:
    """Lazily opened image -> resized (res x res, bicubic) uint8 [3, res, res] tensor. Deterministic."""

    def __init__(self, res: int = 384, draft: bool = True) -> None:
        assert res > 0, res
        self.res, self.draft = res, draft

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Returns uint8 [3, res, res]; see `normalize_images`."""
        box = (0, 0, img.size[0], img.size[1])
        return to_chw_tensor(decode_region(img, box, self.res, self.draft))  # PIL: as the official test transform


def build_train_transform(
    res: int, *, finetune: bool = False, draft: bool = True, resize: Resize = "cv2_upscale"
) -> TrainTransform:
    """Pretraining transform (scale 0.2-1) or fine-tuning transform (scale 0.5-1)."""
    return TrainTransform(res, FINETUNE_SCALE if finetune else PRETRAIN_SCALE, draft=draft, resize=resize)
