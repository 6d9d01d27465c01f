"""Pure state-dict converters: official ALBEF <-> ours, timm/DeiT ViT -> ours, HF BERT -> ours.

Each converter is a rename table over a plain dict, checks every tensor's shape against the target
config (built on the `meta` device, so nothing is allocated), and returns a `ConversionReport` saying what
was mapped, skipped (and why), interpolated, missing and unexpected. A shape mismatch always raises;
unexpected keys raise unless `strict=False`; missing keys are reported for the caller to judge (e.g. a
fine-tuned checkpoint has no MLM head, HF BERT has no cross-attention).

Our layout = the official one minus: `text_encoder.bert.` -> `text_encoder.` (the fine-tuned layout),
no `embeddings.position_ids` buffer (recomputed), no `cls.predictions.decoder.*` (tied structurally to
the word embeddings and to `cls.predictions.bias`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import ALBEFConfig, TextConfig, VisionConfig
from model.vision import resample_pos_embed

__all__ = [
    "ConversionReport",
    "from_official",
    "to_official",
    "vision_from_timm",
    "text_from_hf_bert",
    "expected_shapes",
]

StateDict = dict[str, torch.Tensor]
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_m.")
_BERT_BODY = re.compile(r"^(text_encoder(?:_m)?)\.bert\.(.*)$")


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (source key, our key)
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    interpolated: list[str] = field(default_factory=list)  # our keys resampled to the target resolution
    missing: list[str] = field(default_factory=list)  # our keys the source did not provide
    unexpected: list[str] = field(default_factory=list)  # source keys with no place in our model
    layout: str = ""  # what the source looked like ("pretrain", "finetune", "timm", "hf_bert")

    def summary(self) -> str:
        return (
            f"{self.layout}: {len(self.mapped)} mapped, {len(self.skipped)} skipped, "
            f"{len(self.interpolated)} interpolated {self.interpolated}, missing {self.missing}, "
            f"unexpected {self.unexpected}"
        )


def expected_shapes(target: ALBEFConfig | VisionConfig | TextConfig) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for a config, from a model built on the meta device (no memory)."""
    from model.albef import build_albef  # local: albef imports nothing from here, but keep the graph flat
    from model.text import build_text_encoder
    from model.vision import build_vision_encoder

    with torch.device("meta"):
        if isinstance(target, ALBEFConfig):
            module: torch.nn.Module = build_albef(target)
        elif isinstance(target, VisionConfig):
            module = build_vision_encoder(target)
        else:
            module = build_text_encoder(target)
    return {k: v.shape for k, v in module.state_dict().items()}


def _unwrap(sd: dict[str, Any]) -> StateDict:
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict has non-tensor entries {bad[:5]}")
    return sd


def _tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_meta or b.is_meta or (a.shape == b.shape and torch.equal(a, b))


def _check_tied(sd: StateDict, key: str, tied_to: str) -> None:
    if tied_to in sd and not _tensors_equal(sd[key], sd[tied_to]):
        raise ValueError(f"{key} differs from {tied_to}; our model ties them, so this checkpoint cannot load")


def _finish(out: StateDict, report: ConversionReport, shapes: dict[str, torch.Size], strict: bool) -> None:
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(shapes[key]):
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(shapes[key])}")
    report.missing = sorted(set(shapes) - set(out))
    if strict and report.unexpected:
        raise ValueError(f"{report.layout} checkpoint has keys our model does not know: {report.unexpected}")


def from_official(
    state_dict: dict[str, Any], target: ALBEFConfig, *, strict: bool = True
) -> tuple[StateDict, ConversionReport]:
    """Official ALBEF checkpoint (`{'model': sd}` or sd; pretrain or fine-tuned layout) -> our state dict.

    Position embeddings of `visual_encoder` and `visual_encoder_m` are resampled to `target`'s image
    size (bicubic, CLS kept); queues of another size than `target.queue_size` are skipped (re-initialised).
    """
    sd = _unwrap(state_dict)
    shapes = expected_shapes(target)
    report = ConversionReport(layout="pretrain" if any(_BERT_BODY.match(k) for k in sd) else "finetune")
    queue_ok = all(k not in sd or tuple(sd[k].shape) == tuple(shapes[k]) for k in ("image_queue", "text_queue"))
    out: StateDict = {}
    for key, tensor in sd.items():
        ours = _BERT_BODY.sub(r"\1.\2", key)
        if ours.endswith("embeddings.position_ids"):
            report.skipped[key] = "position ids are recomputed"
        elif ours.endswith("cls.predictions.decoder.weight"):
            _check_tied(
                sd, key, key.replace("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
            )
            report.skipped[key] = "tied to embeddings.word_embeddings.weight"
        elif ours.endswith("cls.predictions.decoder.bias"):
            _check_tied(sd, key, key.replace("decoder.bias", "bias"))
            report.skipped[key] = "tied to cls.predictions.bias"
        elif key == "idx_queue":
            report.skipped[key] = "fine-tuning queue of image ids (not in the pretraining model)"
        elif ".pooler." in ours and ours.startswith(_TEXT_PREFIXES):
            report.skipped[key] = "BERT pooler (ALBEF uses none)"
        elif key in ("image_queue", "text_queue", "queue_ptr") and not queue_ok:
            report.skipped[key] = f"queue size differs from target queue_size={target.queue_size}; re-initialised"
        elif ours not in shapes:
            report.unexpected.append(key)
        else:
            if ours.endswith(".pos_embed") and tuple(tensor.shape) != tuple(shapes[ours]):
                tensor = resample_pos_embed(tensor, target.vision.grid_size)
                report.interpolated.append(ours)
            out[ours] = tensor
            report.mapped.append((key, ours))
    _finish(out, report, shapes, strict)
    return out, report


def to_official(our_sd: StateDict) -> StateDict:
    """Our state dict -> the official pretrain layout (`text_encoder.bert.*`, tied decoder, position_ids)."""
    out: StateDict = {}
    for key, tensor in our_sd.items():
        prefix, _, rest = key.partition(".")
        if prefix in ("text_encoder", "text_encoder_m") and rest.startswith(("embeddings.", "encoder.")):
            out[f"{prefix}.bert.{rest}"] = tensor
        else:
            out[key] = tensor
    for prefix in ("text_encoder", "text_encoder_m"):
        words = out.get(f"{prefix}.bert.embeddings.word_embeddings.weight")
        if words is None:
            continue
        n_pos = out[f"{prefix}.bert.embeddings.position_embeddings.weight"].shape[0]
        out[f"{prefix}.bert.embeddings.position_ids"] = torch.arange(n_pos, device=words.device)[None]
        if f"{prefix}.cls.predictions.bias" in out:
            out[f"{prefix}.cls.predictions.decoder.weight"] = words
            out[f"{prefix}.cls.predictions.decoder.bias"] = out[f"{prefix}.cls.predictions.bias"]
    return out


_TIMM_SKIP = {
    "head.": "classifier head",
    "head_dist.": "distillation head",
    "pre_logits.": "pre-logits layer",
    "fc_norm.": "pooled-feature norm (ALBEF uses the CLS token after `norm`)",
}


def vision_from_timm(
    state_dict: dict[str, Any], target: VisionConfig, *, strict: bool = True
) -> tuple[StateDict, ConversionReport]:
    """timm/DeiT ViT state dict -> our `VisionEncoder` keys (no prefix); pos-embed resampled to `target`."""
    sd = _unwrap(state_dict)
    shapes = expected_shapes(target)
    report = ConversionReport(layout="timm")
    out: StateDict = {}
    for key, tensor in sd.items():
        skip = next((why for prefix, why in _TIMM_SKIP.items() if key.startswith(prefix)), None)
        if skip is not None:
            report.skipped[key] = skip
        elif key == "dist_token":
            report.skipped[key] = "DeiT distillation token (its position slot is dropped too)"
        elif key not in shapes:
            report.unexpected.append(key)
        else:
            if key == "pos_embed":
                if "dist_token" in sd:  # [CLS, DIST, patches] -> [CLS, patches]
                    tensor = torch.cat([tensor[:, :1], tensor[:, 2:]], dim=1)
                if tuple(tensor.shape) != tuple(shapes[key]):
                    tensor = resample_pos_embed(tensor, target.grid_size)
                    report.interpolated.append(key)
            out[key] = tensor
            report.mapped.append((key, key))
    _finish(out, report, shapes, strict)
    return out, report


def _hf_bert_key(key: str) -> str:
    key = key.removeprefix("bert.")
    if ".LayerNorm." in key:  # original Google checkpoints (bert-base-uncased .bin): gamma/beta
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return key


def text_from_hf_bert(
    state_dict: dict[str, Any], target: TextConfig, *, strict: bool = True
) -> tuple[StateDict, ConversionReport]:
    """HF BERT (`BertModel` or `BertForMaskedLM`) state dict -> our `TextEncoder` keys (no prefix).

    Layer N of the checkpoint fills our layer N, text and fusion layers alike (ALBEF initialises the
    fusion layers' self-attention/FFN from BERT layers fusion_layer..); `crossattention.*` stays missing.
    """
    sd = {_hf_bert_key(k): v for k, v in _unwrap(state_dict).items()}
    shapes = expected_shapes(target)
    report = ConversionReport(layout="hf_bert")
    out: StateDict = {}
    for key, tensor in sd.items():
        if key.endswith("position_ids"):
            report.skipped[key] = "position ids are recomputed"
        elif key.startswith("pooler."):
            report.skipped[key] = "BERT pooler (ALBEF uses none)"
        elif key.startswith("cls.seq_relationship."):
            report.skipped[key] = "next-sentence head (unused)"
        elif key == "cls.predictions.decoder.weight":
            _check_tied(sd, key, "embeddings.word_embeddings.weight")
            report.skipped[key] = "tied to embeddings.word_embeddings.weight"
        elif key == "cls.predictions.decoder.bias":
            _check_tied(sd, key, "cls.predictions.bias")
            report.skipped[key] = "tied to cls.predictions.bias"
        elif key not in shapes:
            report.unexpected.append(key)
        else:
            out[key] = tensor
            report.mapped.append((key, key))
    _finish(out, report, shapes, strict)
    return out, report
