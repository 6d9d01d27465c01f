"""The training loaders hand over uint8 images; `batch_tensors` normalises them after the copy."""

from __future__ import annotations

import torch

from pipeline.data.transforms import normalize_images
from pipeline.train.albef_task import batch_tensors


def test_uint8_images_normalised_on_the_device_like_the_workers_would() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ids = torch.randint(0, 100, (4, 5))
    batch = {"image": images, "input_ids": ids, "caption": ["unused"] * 4}
    out = batch_tensors(batch, torch.device("cpu"), ("image", "input_ids"))
    assert set(out) == {"image", "input_ids"}
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["image"], normalize_images(images))  # what a normalize=True worker computes
    assert torch.equal(out["input_ids"], ids)  # integer tensors that are not images are left alone


def test_uint8_image_pairs_normalised_too() -> None:
    pairs = torch.randint(0, 256, (2, 2, 3, 8, 8), dtype=torch.uint8)  # NLVR2: [B, 2 images, 3, H, W]
    out = batch_tensors({"image": pairs}, torch.device("cpu"), ("image",))
    assert torch.equal(out["image"], normalize_images(pairs))


def test_float_images_pass_through_unchanged() -> None:
    images = torch.randn(2, 3, 8, 8)
    out = batch_tensors({"image": images}, torch.device("cpu"), ("image",))
    assert torch.equal(out["image"], images)
