"""NLVR2: labels, the text-assignment (TA) and two-image models from a checkpoint, and the evaluation.

Shared by `albef pretrain` with `task: text_assignment` (pipeline/stages/pretrain.py), `albef
finetune nlvr` (build + per-epoch validation) and `albef evaluate nlvr` (pipeline/stages/{finetune,
evaluate}_nlvr.py); no stage imports another.

Data: an `albef prep nlvr2` folder; each sample is one record with its two images (`left.jpg`,
`right.jpg`: the loaders stack them into image [B, 2, 3, R, R]), its sentence as the only caption
and "True"/"False" as its label (data_prep/sources/nlvr2.py, data_prep/pairs.py).

Which checkpoint initialises what (the official chain is ALBEF_4M.pth -> Pretrain_nlvr.py -> NLVR.py):
- the TA model loads a pre-training checkpoint (official or ours: Pretrain_nlvr.py's key loop copies
  fusion layer l into layers 2(l - f) + f and 2(l - f) + f + 1) or a TA checkpoint (resumed TA);
- the NLVR2 model loads a TA checkpoint (NLVR.py's plain load), an official NLVR checkpoint or one of
  our NLVR runs; a pre-training checkpoint is accepted too and goes through the TA import first (the
  duplicated layers without the TA epoch the paper runs: logged as a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from model.config import ALBEFConfig
from model.convert import ConversionReport, to_official
from model.heads.convert import is_official_pretrain
from model.heads.nlvr import (
    ALBEFNLVR,
    ALBEFTextAssignment,
    TAConfig,
    build_nlvr,
    build_text_assignment,
    load_nlvr_state,
    load_text_assignment_state,
    pair_hidden_states,
)
from model.heads.ve import ClassifierConfig
from pipeline.tasks.ve import VEEvalConfig, score_labelled_captions, ve_report

logger = logging.getLogger(__name__)

LABEL_NAMES = ("False", "True")  # index = class id (the official `label = 1 if ann['label'] == 'True'`)
_BACKBONE = ("visual_encoder.", "text_encoder.")
_QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def label_ids(labels: Sequence[Any]) -> torch.Tensor:
    """Class ids int64 [N] of NLVR2 labels given as "True"/"False" (the release's strings), bools or 0/1."""
    ids = []
    for label in labels:
        if isinstance(label, bool):
            ids.append(int(label))
        elif isinstance(label, str) and label in LABEL_NAMES:
            ids.append(LABEL_NAMES.index(label))
        elif isinstance(label, int) and label in (0, 1):
            ids.append(label)
        else:
            raise ValueError(f"not an NLVR2 label: {label!r} (expected 'True', 'False', a bool or 0/1)")
    return torch.tensor(ids, dtype=torch.long)


def _state(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of `{'model': sd}` or sd."""
    sd = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    return cast(dict[str, torch.Tensor], sd)


def _task_layout(sd: dict[str, torch.Tensor]) -> str:
    """ "nlvr" (classifier), "ta" (text assignment) or "pretrain" (an ALBEF checkpoint, ours or official)."""
    if "cls_head.0.weight" in sd:
        return "nlvr"
    if "ta_head.weight" in sd:
        return "ta"
    return "pretrain"


def _official_pretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pre-training checkpoint in the official layout (ours are converted: the official key loops
    that duplicate the fusion layers are written for it)."""
    return sd if is_official_pretrain(sd) else to_official(sd)


def _check_encoders(report: ConversionReport) -> None:
    lost = [k for k in report.missing if k.startswith(_BACKBONE)]
    if lost:
        raise ValueError(
            f"the checkpoint lacks {len(lost)} encoder weights (e.g. {lost[:3]}): not an ALBEF checkpoint?"
        )


def build_ta_from_checkpoint(
    state_dict: dict[str, Any], backbone: ALBEFConfig, sim_temp: float = 0.07
) -> tuple[ALBEFTextAssignment, ConversionReport]:
    """Text-assignment model from a pre-training checkpoint (fusion layers duplicated) or a TA one;
    `sim_temp`: TAConfig.sim_temp (official 0.07)."""
    sd = _state(state_dict)
    layout = _task_layout(sd)
    if layout == "nlvr":
        raise ValueError("an NLVR2 classifier checkpoint cannot start text-assignment pretraining (it is its result)")
    if layout == "pretrain":  # the TA model has no momentum model nor queues: leave them out of the report
        unused = [k for k in sd if k.split(".", 1)[0].endswith("_m") or k in _QUEUES]
        logger.info("text assignment: %d momentum/queue tensors of the pre-training checkpoint unused", len(unused))
        sd = _official_pretrain({k: v for k, v in sd.items() if k not in set(unused)})
    model = build_text_assignment(TAConfig(backbone=backbone, sim_temp=sim_temp))
    report = load_text_assignment_state(model, sd)
    return model, report


def build_nlvr_from_checkpoint(
    state_dict: dict[str, Any], backbone: ALBEFConfig, distill: bool, teacher_from_checkpoint: bool = True
) -> tuple[ALBEFNLVR, ConversionReport]:
    """NLVR2 model with `state_dict` loaded (see the module docstring for the kinds); returns (model,
    conversion report). `teacher_from_checkpoint=False` is NLVR.py's quirk (the teacher keeps its init
    when the checkpoint has none). A missing encoder weight raises."""
    sd = _state(state_dict)
    if _task_layout(sd) == "pretrain":
        logger.warning(
            "the checkpoint is a pre-training one: its fusion layers are duplicated as Pretrain_nlvr.py does, "
            "WITHOUT the text-assignment epoch the paper runs first (albef pretrain --config nlvr_ta ...)"
        )
        ta, _ = build_ta_from_checkpoint(sd, backbone)
        sd = ta.state_dict()
    if not distill:  # no teacher to fill: leave the checkpoint's momentum twins out of the report
        sd = {k: v for k, v in sd.items() if not k.split(".", 1)[0].endswith("_m")}
    model = build_nlvr(ClassifierConfig(backbone=backbone, num_classes=len(LABEL_NAMES), distill=distill))
    report = load_nlvr_state(model, sd, teacher_from_checkpoint=teacher_from_checkpoint)
    _check_encoders(report)
    return model, report


@dataclass
class NLVREvalConfig(VEEvalConfig):
    """NLVR2 evaluation knobs (`--name=value` for `albef evaluate nlvr`, `eval.*` in fine-tuning YAML):
    VE's, with `image_batch_size` counting samples (two images each) and `pairs_per_batch` sentences."""


@torch.no_grad()
def nlvr_logits(
    model: ALBEFNLVR, images: torch.Tensor, index: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits [N, 2] of N sentences, sentence n about the image pair images[index[n]] ([S, 2, 3, H, W]):
    the ViT runs once per image; the fusion as `ALBEFNLVR.logits` on the repeated image tokens."""
    embeds = model.visual_encoder(images.flatten(0, 1))  # [2S, T, D]: left0, right0, left1, ...
    left, right = embeds[0::2][index], embeds[1::2][index]
    cls = pair_hidden_states(model.text_encoder, input_ids, mask, left, right)[-1][:, 0, :]
    return model.cls_head(cls).float()


@torch.no_grad()
def evaluate_nlvr_model(
    model: ALBEFNLVR,
    data: str | Path,
    cfg: VEEvalConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Accuracy of `model` on every sentence of `data`; collective when world_size > 1 (ranks score
    their shards, the counts are summed). Every rank returns {"accuracy", "per_class", "confusion"
    [true][pred], "labels", "num_pairs" (sentences), "num_images" (samples), "bad_samples", "timings"}.
    The model's train/eval mode is restored afterwards."""

    def check_batch(batch: dict) -> None:
        if "labels" not in batch or batch["image"].ndim != 5:
            raise ValueError(f"{data}: samples are not image pairs with labels; is it an `albef prep nlvr2` folder?")

    confusion, images, bad, seconds = score_labelled_captions(
        model, data, cfg, device, logits_fn=nlvr_logits, label_ids_fn=label_ids, num_classes=len(LABEL_NAMES),
        check_batch=check_batch, rank=rank, world_size=world_size, tokenizer=tokenizer,
    )  # fmt: skip
    return ve_report(confusion, images, bad, seconds, labels=LABEL_NAMES)
