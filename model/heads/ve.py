"""SNLI-VE (visual entailment): a 3-way classifier on the fused [CLS], with momentum distillation.

As the official `models/model_ve.py`: the text encoder runs all its layers on the hypothesis,
cross-attending to the premise image in the fusion layers; `cls_head` (Linear, ReLU, Linear) reads the
last [CLS]; the loss is (1 - alpha) * CE + alpha * soft-CE against the momentum model's softmax.
Labels (official `ve_dataset`): contradiction 0, neutral 1, entailment 2.

The classification core (`ALBEFClassifier`) is shared with NLVR2 (model/heads/nlvr.py), which only
changes how the text encoder sees its images.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ALBEFConfig, ModelConfigError
from model.convert import ConversionReport
from model.heads.base import TaskModel, classifier_head
from model.heads.convert import TaskName, convert_task_state
from model.losses import fp32
from model.text import TextEncoder, build_text_encoder
from model.vision import VisionEncoder, build_vision_encoder

__all__ = [
    "ClassifierConfig",
    "ClassifierOutput",
    "ALBEFClassifier",
    "ALBEFVE",
    "VE_LABELS",
    "build_ve",
    "distilled_cross_entropy",
    "load_classifier_state",
]

logger = logging.getLogger(__name__)

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}  # official ve_dataset label map


@dataclass(frozen=True)
class ClassifierConfig:
    """A classifier on the fused [CLS]: SNLI-VE (3 classes) or NLVR2 (2)."""

    backbone: ALBEFConfig = field(default_factory=ALBEFConfig)  # encoders, momentum (ITC fields unused)
    num_classes: int = 3  # classes of the head
    distill: bool = True  # momentum teacher + distillation loss (official configs: True)

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ModelConfigError(
                f"ClassifierConfig.num_classes={self.num_classes!r}: must be an int >= 2",
                field="num_classes",
                value=self.num_classes,
            )


@dataclass
class ClassifierOutput:
    """One classification forward. `cls_loss` is the only loss term (fp32 scalar)."""

    cls_loss: torch.Tensor
    logits: torch.Tensor  # [B, C] fp32
    logits_m: torch.Tensor | None  # [B, C] fp32 teacher logits (None without distillation)
    acc: torch.Tensor  # scalar, argmax == target

    @property
    def loss(self) -> torch.Tensor:
        return self.cls_loss

    def losses(self) -> dict[str, torch.Tensor]:
        return {"cls_loss": self.cls_loss}

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"acc": self.acc}


@fp32
def distilled_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, logits_m: torch.Tensor | None, alpha: float | torch.Tensor
) -> torch.Tensor:
    """(1 - alpha) * CE(logits, targets) + alpha * mean_b(-sum_c log_softmax(logits) softmax(logits_m));
    plain CE without a teacher. logits / logits_m [B, C], targets [B] class ids."""
    logits = logits.float()
    hard = F.cross_entropy(logits, targets)
    if logits_m is None:
        return hard
    soft = -(F.log_softmax(logits, dim=1) * F.softmax(logits_m.float(), dim=1)).sum(dim=1).mean()
    return (1 - alpha) * hard + alpha * soft


class ALBEFClassifier(TaskModel):
    """ViT + BERT (text and fusion layers) + `cls_head` on the fused [CLS]; momentum twins of all three.

    Subclasses define `fused_cls(encoders..., image, input_ids, attention_mask)`; here: one image per text.
    """

    momentum_modules = ("visual_encoder", "text_encoder", "cls_head")
    visual_encoder_m: VisionEncoder
    text_encoder_m: TextEncoder
    cls_head_m: torch.nn.Sequential

    def __init__(self, config: ClassifierConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        if text_encoder.cls is not None:
            raise ValueError("the classifier takes a text encoder without MLM head")
        self.config = config
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.cls_head = classifier_head(text_encoder.config.hidden_size, config.num_classes)
        self._make_twins(config.backbone.momentum, config.backbone.momentum_dropout, enabled=config.distill)

    def fused_cls(
        self, visual_encoder: Any, text_encoder: Any, image: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused [CLS] [B, D]: all text layers on the text, fusion layers cross-attending to the image."""
        image_embeds = visual_encoder(image)
        return text_encoder(input_ids, mask, image_embeds=image_embeds, mode="full")[:, 0, :]

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] (fp32): the evaluation path."""
        cls = self.fused_cls(self.visual_encoder, self.text_encoder, image, input_ids, attention_mask)
        return self.cls_head(cls).float()

    @torch.no_grad()
    def logits_m(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The momentum teacher's logits [B, C] (fp32)."""
        cls = self.fused_cls(self.visual_encoder_m, self.text_encoder_m, image, input_ids, attention_mask)
        return self.cls_head_m(cls).float()

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        alpha: float | torch.Tensor,
    ) -> ClassifierOutput:
        """Inputs: image [B, 3, H, W] (NLVR2: [2B, ...], the B left images then the B right ones),
        input_ids / attention_mask [B, L], targets [B] class ids, alpha the distillation weight."""
        logits = self.logits(image, input_ids, attention_mask)
        logits_m = self.logits_m(image, input_ids, attention_mask) if self.has_teacher else None
        loss = distilled_cross_entropy(logits, targets, logits_m, alpha)
        acc = (logits.detach().argmax(1) == targets).float().mean()
        return ClassifierOutput(loss, logits, logits_m, acc)


class ALBEFVE(ALBEFClassifier):
    """SNLI-VE: image = the premise, text = the hypothesis, 3 classes (`VE_LABELS`)."""


def build_ve(config: ClassifierConfig) -> ALBEFVE:
    text_encoder = build_text_encoder(config.backbone.text, with_mlm_head=False)
    model = ALBEFVE(config, build_vision_encoder(config.backbone.vision), text_encoder)
    logger.info("built ALBEF SNLI-VE: %.1fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def meta_shapes(builder: Any, config: Any) -> dict[str, torch.Size]:
    """State-dict keys and shapes of `builder(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = builder(config)
    return {k: v.shape for k, v in module.state_dict().items()}


def load_classifier_state(
    model: ALBEFClassifier,
    state_dict: dict[str, Any],
    *,
    task: TaskName,
    builder: Any,
    teacher_from_checkpoint: bool = True,
    tied: tuple[tuple[str, str], ...] = (),
) -> ConversionReport:
    """Load an official task checkpoint, an official pre-trained one (the task script's key loop) or ours.

    Missing keys keep their init (the head, when fine-tuning from pre-training); the rest must fit.
    Teacher: a checkpoint without momentum weights (pre-trained VE import, NLVR's text-assignment
    checkpoint) leaves the twins missing. With `teacher_from_checkpoint` (default) the teacher is then
    copied from the loaded student weights, so distillation starts from the checkpoint. False reproduces
    the official NLVR.py, which calls `copy_params()` BEFORE loading: the teacher keeps its random/BERT
    init (see the fixture README, quirks).
    """
    shapes = meta_shapes(builder, model.config)
    out, report = convert_task_state(
        state_dict, shapes, task=task, fusion_layer=model.config.backbone.text.fusion_layer, tied=tied
    )
    result = model.load_state_dict(out, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # convert_task_state kept our keys only
    missing_twins = sorted({k.split(".")[0] for k in result.missing_keys} & set(model._twins))
    if missing_twins and teacher_from_checkpoint:
        model.copy_params(missing_twins)
    logger.info(
        "%s weights loaded (%s); teachers %s %s",
        task,
        report.summary(),
        missing_twins or "none missing",
        "copied from the student" if teacher_from_checkpoint else "left at their init (official NLVR.py)",
    )
    return report


def config_with_text(config: ClassifierConfig, **text_overrides: Any) -> ClassifierConfig:
    """`config` with some TextConfig fields replaced (NLVR2's deeper text encoder)."""
    text = dataclasses.replace(config.backbone.text, **text_overrides)
    return dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, text=text))
