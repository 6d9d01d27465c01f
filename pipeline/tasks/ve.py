"""SNLI-VE: labels, the model from a checkpoint, and the evaluation (accuracy over every hypothesis).

Shared by `albef finetune ve` (build + per-epoch validation) and `albef evaluate ve`
(pipeline/stages/{finetune,evaluate}_ve.py); neither stage imports the other.

Data: an `albef prep snli_ve` folder; each sample is one premise image whose json carries its
hypotheses as `captions` and their gold labels as `labels` (data_prep/sources/snli_ve.py).
Training draws one hypothesis per image visit (pipeline.data: the batch's `label`); evaluation
scores every hypothesis once, encoding each image once and fusing it with each of its hypotheses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model.config import ALBEFConfig
from model.heads.ve import ALBEFVE, VE_LABELS, ClassifierConfig, build_ve, load_classifier_state
from pipeline.config import check
from pipeline.data import build_eval_loader
from pipeline.data.text import build_tokenizer, tokenize
from pipeline.runtime.distributed import all_reduce_sum
from pipeline.tasks.metrics import classification_accuracy

logger = logging.getLogger(__name__)

LABEL_NAMES = tuple(sorted(VE_LABELS, key=VE_LABELS.__getitem__))  # index = class id
_BACKBONE = ("visual_encoder.", "text_encoder.")


def label_ids(labels: Sequence[Any]) -> torch.Tensor:
    """Class ids int64 [N] of SNLI-VE labels given as names ("entailment") or ids (2)."""
    ids = []
    for label in labels:
        if isinstance(label, str) and label in VE_LABELS:
            ids.append(VE_LABELS[label])
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(VE_LABELS):
            ids.append(label)
        else:
            raise ValueError(f"not an SNLI-VE label: {label!r} (expected one of {LABEL_NAMES} or 0..2)")
    return torch.tensor(ids, dtype=torch.long)


def build_ve_from_checkpoint(
    state_dict: dict[str, torch.Tensor], backbone: ALBEFConfig, distill: bool
) -> tuple[ALBEFVE, Any]:
    """SNLI-VE model with `state_dict` loaded (a pretraining checkpoint of ours or official, an
    official VE checkpoint, or one of our VE runs); returns (model, conversion report).

    Missing keys keep their init (the head, from a pretraining checkpoint); a missing encoder weight
    means the checkpoint is not an ALBEF one and raises (DeiT weights that silently did not load
    cost the paper's users 12 points of recall).
    """
    model = build_ve(ClassifierConfig(backbone=backbone, num_classes=len(VE_LABELS), distill=distill))
    if not distill:  # no teacher to fill: leave the checkpoint's momentum twins out of the report
        state_dict = {k: v for k, v in state_dict.items() if not k.split(".", 1)[0].endswith("_m")}
    report = load_classifier_state(model, state_dict, task="ve", builder=build_ve)
    lost = [k for k in report.missing if k.startswith(_BACKBONE)]
    if lost:
        raise ValueError(
            f"the checkpoint lacks {len(lost)} encoder weights (e.g. {lost[:3]}): not an ALBEF checkpoint?"
        )
    return model, report


@dataclass
class VEEvalConfig:
    """SNLI-VE evaluation knobs (`--name=value` for `albef evaluate ve`, `eval.*` in fine-tuning YAML).

    During fine-tuning's validation the model is in memory: image_res, preset, precision, device,
    dataset apply to `albef evaluate ve` only.
    """

    image_batch_size: int = 64  # premise images per ViT forward
    pairs_per_batch: int = 256  # (image, hypothesis) pairs per fusion forward (memory knob)
    max_words: int = 30  # pre_caption word cut
    max_tokens: int = 35  # tokenizer max length
    num_workers: int = 4  # loader worker processes
    image_res: int | None = None  # px; None = the checkpoint's model resolution
    preset: Literal["auto", "tiny", "base"] = "auto"  # model size when the checkpoint carries no config
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = fp16 on a GPU, fp32 on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the bundled one
    dataset: str | None = None  # name in the output file; None = the manifest's `source`

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("image_batch_size", "pairs_per_batch", "max_words"):
            check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.max_tokens >= 3, f"{p}max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.num_workers >= 0, f"{p}num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.image_res is None or self.image_res >= 1, f"{p}image_res", f"must be >= 1, got {self.image_res}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{p}vocab", f"file not found: {self.vocab}")


@torch.no_grad()
def ve_logits(
    model: ALBEFVE, images: torch.Tensor, image_index: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits [N, 3] of N (image, hypothesis) pairs, hypothesis n on image image_index[n]: the ViT runs
    once per image; the fusion as `ALBEFVE.logits` on the repeated image tokens."""
    image_embeds = model.visual_encoder(images)
    cls = model.text_encoder(input_ids, mask, image_embeds=image_embeds[image_index], mode="full")[:, 0, :]
    return model.cls_head(cls).float()


@torch.no_grad()
def evaluate_ve_model(
    model: ALBEFVE,
    data: str | Path,
    cfg: VEEvalConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Accuracy of `model` on every hypothesis of `data`; collective when world_size > 1 (each rank
    scores its share of the shards, the counts are summed). Every rank returns the same result:
    {"accuracy", "per_class" {label: accuracy}, "confusion" [true][pred] counts, "num_pairs",
    "num_images", "bad_samples", "timings"}. The model's train/eval mode is restored afterwards."""

    def check_batch(batch: dict) -> None:
        if "labels" not in batch:
            raise ValueError(f"{data}: samples carry no `labels`; is it an `albef prep snli_ve` folder?")

    confusion, images, bad, seconds = score_labelled_captions(
        model, data, cfg, device, logits_fn=ve_logits, label_ids_fn=label_ids, num_classes=len(VE_LABELS),
        check_batch=check_batch, rank=rank, world_size=world_size, tokenizer=tokenizer,
    )  # fmt: skip
    return ve_report(confusion, images, bad, seconds)


@torch.no_grad()
def score_labelled_captions(
    model: Any,
    data: str | Path,
    cfg: VEEvalConfig,
    device: torch.device,
    *,
    logits_fn: Callable[..., torch.Tensor],
    label_ids_fn: Callable[[Sequence[Any]], torch.Tensor],
    num_classes: int,
    check_batch: Callable[[dict], None],
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
) -> tuple[torch.Tensor, int, int, float]:
    """The classification loop SNLI-VE and NLVR2 share: every (image(s), caption, label) of `data`
    scored once by `logits_fn(model, images, index, ids, mask)`; collective when world_size > 1 (each
    rank scores its shards, the counts are summed). Returns (confusion [true][pred], images, bad
    samples, seconds); the model's train/eval mode is restored afterwards."""
    tokenizer = tokenizer or build_tokenizer(cfg.vocab)
    loader = build_eval_loader(
        [data],
        batch_size=cfg.image_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        image_res=model.config.backbone.vision.image_size,
        max_words=cfg.max_words,
    )
    dtype = next(model.parameters()).dtype
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts = torch.zeros(2, dtype=torch.long)  # images (samples), bad samples
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for batch in loader:
            check_batch(batch)
            pairs = [(i, c, lab) for i, (caps, labs) in enumerate(zip(batch["captions"], batch["labels"])) for c, lab in zip(caps, labs) if c]  # fmt: skip
            images = batch["image"].to(device, dtype=dtype, non_blocking=True)
            for s in range(0, len(pairs), cfg.pairs_per_batch):
                chunk = pairs[s : s + cfg.pairs_per_batch]
                ids, mask = tokenize(tokenizer, [c for _, c, _ in chunk], cfg.max_tokens)
                index = torch.tensor([i for i, _, _ in chunk], device=device)
                pred = logits_fn(model, images, index, ids.to(device), mask.to(device)).argmax(1).cpu()
                target = label_ids_fn([lab for _, _, lab in chunk])
                confusion.index_put_((target, pred), torch.ones_like(target), accumulate=True)
            counts += torch.tensor([len(batch["captions"]), sum(batch.get("bad_samples", {}).values())])
    finally:
        model.train(was_training)
    confusion, counts = all_reduce_sum(confusion.to(device)).cpu(), all_reduce_sum(counts.to(device)).cpu()
    return confusion, int(counts[0]), int(counts[1]), time.perf_counter() - t0


def weights_summary(report: Any) -> dict[str, Any]:
    """A conversion report in a few lines of JSON (counts, and the keys that were not loaded)."""
    return {
        "layout": report.layout,
        "mapped": len(report.mapped),
        "interpolated": list(report.interpolated),
        "missing": list(report.missing),
        "unexpected": list(report.unexpected)[:20],
        "num_unexpected": len(report.unexpected),
    }


def ve_report(
    confusion: torch.Tensor, num_images: int, bad_samples: int, seconds: float, labels: Sequence[str] = LABEL_NAMES
) -> dict[str, Any]:
    """The result dict of `evaluate_ve_model` from a [true, pred] confusion matrix (also NLVR2's, whose
    `labels` are its two classes)."""
    n = int(confusion.sum())
    if n == 0:
        raise ValueError("no hypothesis was scored (empty split?)")
    truth = torch.arange(len(labels)).repeat_interleave(confusion.sum(1))
    pred = torch.cat([torch.arange(len(labels)).repeat_interleave(row) for row in confusion])
    per_class = {
        name: 100.0 * float(confusion[c, c]) / float(confusion[c].sum())
        for c, name in enumerate(labels)
        if confusion[c].sum() > 0
    }
    return {
        "accuracy": classification_accuracy(pred, truth),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
        "num_pairs": n,
        "num_images": num_images,
        "bad_samples": bad_samples,
        "timings": {"eval_s": seconds},
    }
