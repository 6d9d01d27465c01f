"""Weakly supervised grounding (RefCOCO+): the model from a checkpoint, and the evaluation (Grad-CAM
per expression, proposal ranking, accuracy at IoU >= 0.5 per split), optionally writing the maps.

Shared by `albef finetune grounding` (per-epoch validation) and `albef evaluate grounding`
(pipeline/stages/{finetune,evaluate}_grounding.py); neither stage imports the other.

The model is the retrieval model (model/retrieval.py), fine-tuned with the retrieval losses as the
official Grounding.py does. Data: an `albef prep refcoco+ --split val|test` folder; each sample is one
image whose json carries its expressions as `captions` and, aligned, one `labels` object per
expression {ref_id, split, box, proposals, image_hw} (data_prep/sources/refcoco.py). As the official
`Grounding.val` + `grounding_eval`: the expressions are tokenised `refs_per_batch` at a time with
padding to the longest, Grad-CAM (model/heads/grounding.py) is taken per (image, expression), the
[g, g] map is upsampled to the ORIGINAL image size (boxes are in its pixels; the loader's square
resize does not matter) and the proposals are ranked by map mass / area ** box_alpha.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.config import ALBEFConfig
from model.heads.grounding import (
    best_proposal,
    box_iou,
    itc_gradcam,
    itm_gradcam,
    official_gradcam_blocks,
    proposal_scores,
    upsample_gradcam,
)
from model.retrieval import ALBEFRetrieval, build_retrieval, load_retrieval_state
from pipeline.config import check
from pipeline.data import build_eval_loader
from pipeline.data.text import build_tokenizer, tokenize
from pipeline.data.transforms import normalize_images
from pipeline.runtime.distributed import all_gather_objects
from pipeline.runtime.io import write_atomic
from pipeline.tasks.metrics import grounding_accuracy

logger = logging.getLogger(__name__)

_LABEL_KEYS = ("ref_id", "split", "box", "proposals", "image_hw")


def build_grounding_from_checkpoint(
    state_dict: dict[str, torch.Tensor], backbone: ALBEFConfig
) -> tuple[ALBEFRetrieval, Any]:
    """The retrieval model with `state_dict` loaded (an official grounding/retrieval checkpoint, a
    pretraining one, or one of our runs); returns (model, conversion report). Anything but the queues
    missing raises (load_retrieval_state)."""
    model = build_retrieval(backbone)
    report = load_retrieval_state(model, state_dict)
    return model, report


@dataclass
class GroundingEvalConfig:
    """Grounding evaluation knobs (`--name=value` for `albef evaluate grounding`, `eval.*` in fine-tuning YAML).

    During fine-tuning's validation the model is in memory: image_res, preset, precision, device,
    dataset and write_maps apply to `albef evaluate grounding` only.
    """

    mode: Literal["itm", "itc"] = "itm"  # Grad-CAM of the ITM cross-attention (paper) or of ITC's ViT block
    block: int | None = None  # text layer (itm) / ViT block (itc); None = official --block_num 8 scaled to depth
    box_alpha: float = 0.5  # proposal score = map mass / area ** box_alpha (official alpha=0.5)
    iou_threshold: float = 0.5  # a hit: IoU of the chosen proposal with the GT box >= this
    image_batch_size: int = 32  # images per loader batch
    refs_per_batch: int = 32  # expressions per Grad-CAM forward/backward (official batch_size 32)
    max_words: int = 30  # pre_caption word cut
    max_tokens: int = 512  # tokenizer cut (official: padding='longest', no max_length)
    num_workers: int = 4  # loader worker processes
    image_res: int | None = None  # px; None = the checkpoint's model resolution
    preset: Literal["auto", "tiny", "base"] = "auto"  # model size when the checkpoint carries no config
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = fp16 on a GPU, fp32 on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the bundled one
    dataset: str | None = None  # name in the output file; None = the manifest's `source`
    write_maps: int = 0  # Grad-CAM maps written as PNG (heatmap, GT box green, chosen box red), first N refs

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("image_batch_size", "refs_per_batch", "max_words"):
            check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.max_tokens >= 3, f"{p}max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.num_workers >= 0, f"{p}num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.block is None or self.block >= 0, f"{p}block", f"must be >= 0, got {self.block}")
        check(self.box_alpha >= 0, f"{p}box_alpha", f"must be >= 0, got {self.box_alpha}")
        check(0 < self.iou_threshold <= 1, f"{p}iou_threshold", f"must be in (0, 1], got {self.iou_threshold}")
        check(self.write_maps >= 0, f"{p}write_maps", f"must be >= 0, got {self.write_maps}")
        check(self.image_res is None or self.image_res >= 1, f"{p}image_res", f"must be >= 1, got {self.image_res}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{p}vocab", f"file not found: {self.vocab}")

    def gradcam_block(self, config: ALBEFConfig) -> int:
        return self.block if self.block is not None else official_gradcam_blocks(config)[self.mode]


@dataclass(frozen=True)
class RefResult:
    """One expression's outcome."""

    ref_id: int
    split: str
    iou: float | None  # None: no proposal scored > 0 (a miss)
    chance: float  # fraction of the proposals with IoU >= threshold (the random-proposal hit rate)
    pred_box: list[float] | None


def grounding_gradcams(
    model: ALBEFRetrieval,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: Literal["itm", "itc"],
    block: int,
) -> torch.Tensor:
    """Grad-CAM maps fp32 [N, g, g] (on the CPU) of N (image, expression) pairs: images [N, 3, R, R]
    normalised, one row per expression; the official arithmetic of `Grounding.val` per mode."""
    gradcam_fn = itm_gradcam if mode == "itm" else itc_gradcam
    return gradcam_fn(model, images, input_ids, attention_mask, block).gradcam.cpu()


def score_ref(gradcam: torch.Tensor, label: dict[str, Any], cfg: GroundingEvalConfig) -> RefResult:
    """Rank one expression's proposals by its [g, g] Grad-CAM map (official grounding_eval)."""
    height, width = label["image_hw"]
    heatmap = upsample_gradcam(gradcam, int(height), int(width))
    proposals = label["proposals"]
    box = best_proposal(proposal_scores(heatmap, proposals, cfg.box_alpha), proposals)
    iou = box_iou(label["box"], box) if box is not None else None
    good = sum(box_iou(label["box"], p[:4]) >= cfg.iou_threshold for p in proposals)
    return RefResult(int(label["ref_id"]), str(label["split"]), iou, good / len(proposals), box)


def _check_label(label: Any) -> dict[str, Any]:
    if not isinstance(label, dict) or any(k not in label for k in _LABEL_KEYS) or not label["proposals"]:
        raise ValueError(
            f"not a grounding label {label!r}: expected {_LABEL_KEYS} (is it an `albef prep refcoco+ --split val|test` folder?)"
        )
    return label


def write_gradcam_map(
    path: Path, image: torch.Tensor, gradcam: torch.Tensor, label: dict, result: RefResult, text: str
) -> None:
    """PNG of the Grad-CAM map over the image at its original size: heatmap (min-max normalised, for
    display only), GT box green, chosen box red, the expression written on top."""
    height, width = (int(v) for v in label["image_hw"])
    base = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((width, height), Image.Resampling.BICUBIC)
    heat = upsample_gradcam(gradcam, height, width)
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    jet = torch.stack([(1.5 - (4 * heat - c).abs()).clamp(0, 1) for c in (3, 2, 1)], -1)  # [H, W, 3]
    rgb = torch.from_numpy(np.asarray(base).copy()).float() / 255
    mixed = ((0.5 * rgb + 0.5 * jet) * 255).round().to(torch.uint8).numpy()
    out = Image.fromarray(mixed)
    draw = ImageDraw.Draw(out)
    draw.text((2, 2), text[:60], fill=(255, 255, 255))
    for box, colour in ((label["box"], (0, 255, 0)), (result.pred_box, (255, 0, 0))):
        if box is not None:
            x, y, w, h = box[:4]
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=max(1, round(min(width, height) / 150)))
    write_atomic(path, lambda tmp: out.save(tmp, format="PNG"))


@torch.no_grad()
def evaluate_grounding_model(
    model: ALBEFRetrieval,
    data: str | Path,
    cfg: GroundingEvalConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
    maps_dir: Path | None = None,
) -> dict[str, Any]:
    """Grounding accuracy of `model` on every expression of `data`; collective when world_size > 1
    (ranks split the shards, results are gathered). Every rank returns the same report (see
    `grounding_report`). Rank 0 writes the first `cfg.write_maps` maps of its share under `maps_dir`.
    The model's train/eval mode is restored afterwards; no parameter gradient is left behind."""
    tokenizer = tokenizer or build_tokenizer(cfg.vocab)
    block = cfg.gradcam_block(model.config)
    loader = build_eval_loader(
        [data],
        batch_size=cfg.image_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        image_res=model.config.vision.image_size,
        max_words=cfg.max_words,
        normalize=False,  # uint8 kept for the maps; normalised below
    )
    dtype = next(model.parameters()).dtype
    results: list[RefResult] = []
    counts = {"images": 0, "bad_samples": 0, "empty_expressions": 0}
    written = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for batch in loader:
            if "labels" not in batch:
                raise ValueError(f"{data}: samples carry no `labels`; is it an `albef prep refcoco+ --split val|test` folder?")  # fmt: skip
            refs = []
            for i, (caps, labels) in enumerate(zip(batch["captions"], batch["labels"])):
                for text, label in zip(caps, labels):
                    if text:
                        refs.append((i, text, _check_label(label)))
                    else:
                        counts["empty_expressions"] += 1
            images = normalize_images(batch["image"]).to(device, dtype=dtype, non_blocking=True)
            for s in range(0, len(refs), cfg.refs_per_batch):
                chunk = refs[s : s + cfg.refs_per_batch]
                ids, mask = tokenize(tokenizer, [t for _, t, _ in chunk], cfg.max_tokens, "longest")
                index = torch.tensor([i for i, _, _ in chunk], device=device)
                cams = grounding_gradcams(model, images[index], ids.to(device), mask.to(device), cfg.mode, block)
                for (i, text, label), cam in zip(chunk, cams):
                    result = score_ref(cam, label, cfg)
                    results.append(result)
                    if maps_dir is not None and rank == 0 and written < cfg.write_maps:
                        name = f"ref{result.ref_id}_{result.split}_{'hit' if (result.iou or 0) >= cfg.iou_threshold else 'miss'}.png"  # fmt: skip
                        write_gradcam_map(maps_dir / name, batch["image"][i], cam, label, result, text)
                        written += 1
            counts["images"] += len(batch["captions"])
            counts["bad_samples"] += sum(batch.get("bad_samples", {}).values())
    finally:
        model.train(was_training)
    results = [r for part in all_gather_objects(results, world_size) for r in part]
    totals = all_gather_objects(counts, world_size)
    merged = {k: sum(c[k] for c in totals) for k in counts}
    return grounding_report(results, cfg, merged, time.perf_counter() - t0, block)


def grounding_report(
    results: Sequence[RefResult], cfg: GroundingEvalConfig, counts: dict[str, int], seconds: float, block: int
) -> dict[str, Any]:
    """{"accuracy" {split: %}, "accuracy_all", "chance" {split: % of a random proposal},
    "upper_bound" {split: % with any proposal good enough}, "num_refs" {split}, counts, timings}."""
    if not results:
        raise ValueError("no expression was scored (empty split?)")
    splits = [r.split for r in results]
    ious = [r.iou for r in results]
    per_split: dict[str, list[RefResult]] = {}
    for r in results:
        per_split.setdefault(r.split, []).append(r)
    return {
        "accuracy": grounding_accuracy(ious, splits, cfg.iou_threshold),
        "accuracy_all": grounding_accuracy(ious, ["all"] * len(ious), cfg.iou_threshold)["all"],
        "chance": {s: 100.0 * sum(r.chance for r in rs) / len(rs) for s, rs in sorted(per_split.items())},
        "upper_bound": {s: 100.0 * sum(r.chance > 0 for r in rs) / len(rs) for s, rs in sorted(per_split.items())},
        "num_refs": {s: len(rs) for s, rs in sorted(per_split.items())},
        "no_positive_score": sum(r.iou is None for r in results),
        "mode": cfg.mode,
        "block": block,
        "iou_threshold": cfg.iou_threshold,
        "num_images": counts["images"],
        "bad_samples": counts["bad_samples"],
        "empty_expressions": counts["empty_expressions"],
        "timings": {"eval_s": seconds},
    }
