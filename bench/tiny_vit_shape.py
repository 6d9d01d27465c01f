"""Can the tiny ViT learn shape at all? Supervised shape/colour of the synthetic scenes (issue 11).

bench/tiny_probe.py shows the tiny ALBEF never uses shape (masked shape words, swapped-shape captions at
chance) while it learns colour. This separates capacity from signal: the same ViT (ALBEFConfig.tiny's
vision tower, fresh, with --patch/--depth/--width), trained only to name the shape and the colour of the
left (top) shape of the two-shape train scenes from its CLS token (two linear heads, summed CE), with the
pretraining transform (crop 0.2-1 + flip + RandAugment) or none, at the recipe's batch and LR. Test
accuracy on the held-out split's two-shape scenes. If it learns shape here within a few hundred steps,
the ViT can carry shape and the pretraining losses do not ask for it.

    PYTHONPATH=. python bench/tiny_vit_shape.py --steps 600 --patch 8 --depth 2
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from tiny_learning import load_data  # noqa: E402
from tiny_probe import labelled  # noqa: E402

from data_prep.synthetic import COLORS, SHAPES  # noqa: E402
from model.config import ALBEFConfig  # noqa: E402
from model.vision import build_vision_encoder  # noqa: E402
from pipeline.data.transforms import (  # noqa: E402
    EvalTransform,
    RandAugment,
    decode_region,
    normalize_images,
    open_image,
    random_resized_crop_box,
    to_chw_tensor,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="/tmp/learn")
    a("--n_train", type=int, default=2000)
    a("--n_test", type=int, default=400)
    a("--data_seed", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--steps", type=int, default=600)
    a("--batch", type=int, default=32)
    a("--lr", type=float, default=3e-4)
    a("--patch", type=int, default=8)
    a("--depth", type=int, default=2)
    a("--width", type=int, default=64)
    a(
        "--aug",
        default="crop,flip,ra",
        help="comma-separated parts of the pretraining transform: crop "
        "(RandomResizedCrop --crop_scale-1), flip (horizontal, p 0.5), ra (RandAugment); 'none' = resize only",
    )
    a("--crop_scale", type=float, default=0.2)
    a("--eval_every", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train, test = load_data(args)
    train, test = labelled(train), labelled(test)
    n_shapes = len(SHAPES)
    vcfg = dataclasses.replace(ALBEFConfig.tiny(image_size=64).vision, patch_size=args.patch, depth=args.depth,
                               width=args.width)  # fmt: skip
    vit = build_vision_encoder(vcfg)
    heads = torch.nn.Linear(args.width, n_shapes + len(COLORS))  # shape logits, then colour logits
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.02)
    ev, ra = EvalTransform(64), RandAugment()
    parts = set(args.aug.split(",")) - {"none"}
    assert parts <= {"crop", "flip", "ra"}, parts

    def tf(img, rng: random.Random) -> torch.Tensor:  # TrainTransform's steps, each optional
        box = (random_resized_crop_box(*img.size, (args.crop_scale, 1.0), rng) if "crop" in parts
               else (0, 0, *img.size))  # fmt: skip
        out: np.ndarray = decode_region(img, box, 64, True, "cv2_upscale")
        if "flip" in parts and rng.random() < 0.5:
            out = cv2.flip(out, 1)
        return to_chw_tensor(ra(out, rng) if "ra" in parts else out)

    rng = random.Random(args.seed)
    x_te = normalize_images(torch.stack([ev(open_image(d)) for d, _ in test]))
    y_te = torch.tensor([lab for _, lab in test])

    def evaluate(step: int) -> None:
        vit.eval()
        with torch.no_grad():
            logits = heads(vit(x_te)[:, 0])
        vit.train()
        shape = logits[:, :n_shapes].argmax(1).eq(y_te[:, 0]).float().mean().item()
        colour = logits[:, n_shapes:].argmax(1).eq(y_te[:, 1]).float().mean().item()
        print(
            f"step {step:4d} test acc shape {100 * shape:5.1f} colour {100 * colour:5.1f} (n={len(test)})", flush=True
        )

    order: list[int] = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
        if step == args.steps:
            break
        imgs, ys = [], []
        for _ in range(args.batch):
            if not order:
                order = list(range(len(train)))
                rng.shuffle(order)
            d, lab = train[order.pop()]
            img = open_image(d)
            imgs.append(tf(img, rng))
            ys.append(lab)
        y = torch.tensor(ys)
        logits = heads(vit(normalize_images(torch.stack(imgs)))[:, 0])
        loss = F.cross_entropy(logits[:, :n_shapes], y[:, 0]) + F.cross_entropy(logits[:, n_shapes:], y[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
