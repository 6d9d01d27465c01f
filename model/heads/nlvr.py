"""NLVR2: one sentence, two images. The two-image text encoder, the classifier, and the text-assignment
(TA) pretraining model that initialises it.

How the official code builds the text encoder (`models/model_nlvr.py`, `model_pretrain_nlvr.py`,
xbert): the text layers of BERT are kept, and every fusion layer is DUPLICATED, one copy per image:
layers [0, f) text, then 2 * (N - f) fusion layers, layer l cross-attending to image (l - f) % 2 (even
offsets the left image, odd the right one). Each pair (f + 2i, f + 2i + 1) shares its cross-attention
key and value projections (`share_cross_attention`); queries, cross-attention output, self-attention and
FFN are not shared. Our encoder is a `TextEncoder` of that depth whose paired layers hold the same
key/value `nn.Linear` modules, so both official keys exist in the state dict and hold one tensor.

Initialisation: `Pretrain_nlvr.py` copies pre-trained fusion layer l into layers 2(l - f) + f and
2(l - f) + f + 1 (model/heads/convert.py), trains the TA task one epoch, and NLVR.py loads that
checkpoint (see `load_classifier_state` for the teacher quirk).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ALBEFConfig, TextConfig
from model.convert import ConversionReport
from model.heads.base import TaskModel
from model.heads.convert import convert_task_state, is_official_pretrain
from model.heads.ve import ALBEFClassifier, ClassifierConfig, load_classifier_state, meta_shapes
from model.text import BertLayer, TextEncoder, build_text_encoder
from model.vision import VisionEncoder, build_vision_encoder

__all__ = [
    "nlvr_text_config",
    "build_nlvr_text_encoder",
    "shared_cross_attention_keys",
    "pair_hidden_states",
    "ALBEFNLVR",
    "build_nlvr",
    "load_nlvr_state",
    "TAConfig",
    "TAOutput",
    "ALBEFTextAssignment",
    "build_text_assignment",
    "load_text_assignment_state",
    "sample_text_assignment",
    "TA_LABELS",
]

logger = logging.getLogger(__name__)

TA_LABELS = {"left": 0, "right": 1, "neither": 2}  # which image the sentence describes (label 2: neither)


def nlvr_text_config(text: TextConfig) -> TextConfig:
    """The two-image encoder's config from the pre-trained BERT's: each fusion layer twice (official:
    12 layers, fusion 6 -> 18)."""
    return dataclasses.replace(text, num_layers=text.fusion_layer + 2 * (text.num_layers - text.fusion_layer))


def _pairs(config: TextConfig) -> range:
    return range(config.fusion_layer, config.num_layers, 2)


def build_nlvr_text_encoder(text: TextConfig) -> TextEncoder:
    """Two-image text encoder (no MLM head) from the PRE-TRAINED text config; paired layers share K/V."""
    encoder = build_text_encoder(nlvr_text_config(text), with_mlm_head=False)
    layers = [cast(BertLayer, layer) for layer in encoder.encoder.layer]
    for first in _pairs(encoder.config):
        cross0, cross1 = layers[first].crossattention, layers[first + 1].crossattention
        assert cross0 is not None and cross1 is not None
        cross0.self.key = cross1.self.key
        cross0.self.value = cross1.self.value
    return encoder


def shared_cross_attention_keys(prefix: str, text: TextConfig) -> list[tuple[str, str]]:
    """Pairs of state-dict keys that are one tensor in `build_nlvr_text_encoder(text)` (under `prefix`)."""
    out = []
    for first in _pairs(nlvr_text_config(text)):
        for proj in ("key", "value"):
            for tensor in ("weight", "bias"):
                name = f"crossattention.self.{proj}.{tensor}"
                out.append((f"{prefix}.encoder.layer.{first}.{name}", f"{prefix}.encoder.layer.{first + 1}.{name}"))
    return out


def pair_hidden_states(
    text_encoder: TextEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image0_embeds: torch.Tensor,
    image1_embeds: torch.Tensor,
) -> list[torch.Tensor]:
    """Hidden states [B, L, D] of the two-image encoder: embeddings, then every layer (fusion layer l
    cross-attends image (l - fusion_layer) % 2). The last one is the fused output."""
    fusion_layer = text_encoder.config.fusion_layer
    keys = attention_mask.bool()[:, None, None, :]  # SDPA: True = attend
    x = text_encoder.embeddings(input_ids)
    states = [x]
    for index, layer in enumerate(text_encoder.encoder.layer):
        image = None if index < fusion_layer else (image0_embeds, image1_embeds)[(index - fusion_layer) % 2]
        x = layer(x, keys, image, None)
        states.append(x)
    return states


def layer_images(text: TextConfig) -> list[int]:
    """Image each layer of the two-image encoder cross-attends (-1: text layer); official `layer_image`."""
    cfg = nlvr_text_config(text)
    return [-1 if i < cfg.fusion_layer else (i - cfg.fusion_layer) % 2 for i in range(cfg.num_layers)]


class ALBEFNLVR(ALBEFClassifier):
    """NLVR2 classifier (2 classes: False 0, True 1). `image` is [2B, 3, H, W]: the B left images, then
    the B right ones (one ViT pass over both, as the official `torch.cat([image0, image1])`)."""

    def fused_cls(
        self, visual_encoder: Any, text_encoder: Any, image: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b = input_ids.shape[0]
        if image.shape[0] != 2 * b:
            raise ValueError(f"NLVR2 needs 2 images per text: got {image.shape[0]} images for {b} texts")
        image_embeds = visual_encoder(image)
        return pair_hidden_states(text_encoder, input_ids, mask, image_embeds[:b], image_embeds[b:])[-1][:, 0, :]


def build_nlvr(config: ClassifierConfig) -> ALBEFNLVR:
    """`config.backbone.text` is the PRE-TRAINED BERT config; the encoder doubles its fusion layers."""
    text_encoder = build_nlvr_text_encoder(config.backbone.text)
    model = ALBEFNLVR(config, build_vision_encoder(config.backbone.vision), text_encoder)
    logger.info("built ALBEF NLVR2: %.1fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def load_nlvr_state(
    model: ALBEFNLVR, state_dict: dict[str, Any], *, teacher_from_checkpoint: bool = True
) -> ConversionReport:
    """Official NLVR checkpoint or a text-assignment checkpoint (ours or official), loaded as is (NLVR.py):
    from the latter `cls_head` and the teacher are missing, and its TA head and projections unexpected
    (ignored, as the official `strict=False` load does).

    `teacher_from_checkpoint=False` reproduces NLVR.py: the teacher is NOT taken from a checkpoint that
    lacks it but keeps its init (the official code copies before it loads).
    """
    sd = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    if is_official_pretrain(sd):
        raise ValueError(
            "an official pre-trained checkpoint does not fit the two-image encoder: run the text-assignment "
            "pretraining on it first (ALBEFTextAssignment, which duplicates the fusion layers as Pretrain_nlvr.py)"
        )
    text = model.config.backbone.text
    tied = tuple(
        shared_cross_attention_keys("text_encoder", text) + shared_cross_attention_keys("text_encoder_m", text)
    )
    return load_classifier_state(
        model, state_dict, task="nlvr", builder=build_nlvr, teacher_from_checkpoint=teacher_from_checkpoint, tied=tied
    )


# -- text-assignment pretraining (model_pretrain_nlvr.py) -------------------------------------------------


@dataclass(frozen=True)
class TAConfig:
    """NLVR2 text-assignment pretraining: which of two images a caption describes (left, right, neither)."""

    backbone: ALBEFConfig = field(default_factory=ALBEFConfig)  # encoders + vision_proj width (embed_dim)
    sim_temp: float = 0.07  # divisor of the image-image similarity used to pick partner images (official
    # literal; the learnable `temp` of pretraining is not used)


@dataclass
class TAOutput:
    ta_loss: torch.Tensor  # scalar fp32 cross-entropy over 3 classes
    logits: torch.Tensor  # [B, 3] fp32
    labels: torch.Tensor  # [B] 0: text b describes the left image, 1: the right one, 2: neither
    image0_idx: torch.Tensor  # [B] left image of pair b
    image1_idx: torch.Tensor  # [B] right image of pair b
    acc: torch.Tensor  # scalar

    @property
    def loss(self) -> torch.Tensor:
        return self.ta_loss

    def losses(self) -> dict[str, torch.Tensor]:
        return {"ta_loss": self.ta_loss}

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"acc": self.acc}


@torch.no_grad()
def sample_text_assignment(
    weights: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of images for the B captions (caption b describes image b), drawn as the official loop.

    For each b: with p 2/3 a partner j ~ weights[b] and, with p 1/2 each, (b, j) label 0 or (j, b)
    label 1; else two partners (j0, j1) ~ weights[b] without replacement, label 2. `weights` [B, B]:
    similarity-weighted, zero diagonal. The draws are made in the official order (rand, multinomial,
    rand, ...), so a seeded global RNG gives the official pairs; B iterations of a few scalar draws.
    Returns (image0_idx, image1_idx, labels), each int64 [B].
    """
    w = weights.float() if generator is None else weights.float().to(generator.device)
    image0, image1, labels = [], [], []
    for b in range(w.shape[0]):
        if bool(torch.rand(1, generator=generator, device=w.device) > 1 / 3):
            j = int(torch.multinomial(w[b], 1, generator=generator))
            if bool(torch.rand(1, generator=generator, device=w.device) > 0.5):
                pair = (b, j, 0)
            else:
                pair = (j, b, 1)
        else:
            j0, j1 = torch.multinomial(w[b], 2, generator=generator).tolist()
            pair = (j0, j1, 2)
        image0.append(pair[0])
        image1.append(pair[1])
        labels.append(pair[2])
    device = weights.device
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (image0, image1, labels))  # type: ignore[return-value]


class ALBEFTextAssignment(TaskModel):
    """ViT + two-image text encoder + `ta_head` (Linear, 3 classes); `vision_proj` only picks partners.

    As the official model: `vision_proj` runs under no_grad, so it is never trained (here frozen); the
    pretraining checkpoint's `temp` and `text_proj` are unused and not kept (their import is reported).
    """

    def __init__(self, config: TAConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(config.backbone.vision.width, config.backbone.embed_dim).requires_grad_(False)
        self.ta_head = nn.Linear(text_encoder.config.hidden_size, len(TA_LABELS))
        self._make_twins(config.backbone.momentum, config.backbone.momentum_dropout, enabled=False)

    @torch.no_grad()
    def assignment_similarity(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, B] fp32 cosine similarity of the images' projected [CLS] / sim_temp."""
        feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        return feat @ feat.t() / self.config.sim_temp

    @torch.no_grad()
    def assignment_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, B] fp32 softmax of `assignment_similarity`, diagonal zeroed (not renormalised)."""
        return F.softmax(self.assignment_similarity(image_embeds), dim=1).fill_diagonal_(0)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image0_idx: torch.Tensor | None = None,
        image1_idx: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TAOutput:
        """Inputs: image [B, 3, H, W], caption b of image b (input_ids / attention_mask [B, L]).
        Given image0_idx / image1_idx / labels replay those pairs instead of sampling them."""
        image_embeds = self.visual_encoder(image)
        if image0_idx is None or image1_idx is None or labels is None:
            image0_idx, image1_idx, labels = sample_text_assignment(self.assignment_weights(image_embeds), generator)
        hidden = pair_hidden_states(
            self.text_encoder, input_ids, attention_mask, image_embeds[image0_idx], image_embeds[image1_idx]
        )[-1]
        logits = self.ta_head(hidden[:, 0, :]).float()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return TAOutput(loss, logits, labels, image0_idx, image1_idx, acc)


def build_text_assignment(config: TAConfig) -> ALBEFTextAssignment:
    text_encoder = build_nlvr_text_encoder(config.backbone.text)
    return ALBEFTextAssignment(config, build_vision_encoder(config.backbone.vision), text_encoder)


_TA_UNUSED = {
    "temp": "unused by the official text-assignment model (its similarity divides by sim_temp)",
    "text_proj.weight": "unused by the official text-assignment model",
    "text_proj.bias": "unused by the official text-assignment model",
}


def load_text_assignment_state(model: ALBEFTextAssignment, state_dict: dict[str, Any]) -> ConversionReport:
    """Official pre-trained checkpoint (Pretrain_nlvr.py's layer duplication), official TA checkpoint or
    ours. Only `ta_head` may be missing (new head); anything else missing raises."""
    shapes = meta_shapes(build_text_assignment, model.config)
    out, report = convert_task_state(
        state_dict,
        shapes,
        task="nlvr_ta",
        fusion_layer=model.config.backbone.text.fusion_layer,
        tied=tuple(shared_cross_attention_keys("text_encoder", model.config.backbone.text)),
        skip=_TA_UNUSED,
    )
    missing = [k for k in report.missing if not k.startswith("ta_head.")]
    if missing:
        raise ValueError(f"checkpoint does not fit the text-assignment model: missing {missing}")
    model.load_state_dict(out, strict=False)
    logger.info("text-assignment weights loaded (%s)", report.summary())
    return report
