"""Reading initial and official weights from files/names into an ALBEF model (the file side of model/convert.py).

Every load goes: read -> pure converter (rename table, pos-embed resampling, shape asserts) -> non-strict
load -> our own check that nothing is missing except what the caller declared acceptable, with missing and
unexpected keys reported separately. The classic ALBEF failure was DeiT weights silently not loading
(Flickr TR@1 82 instead of 94), so anything unexplained raises `WeightLoadError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import BertForMaskedLM

from model.albef import ALBEF
from model.convert import ConversionReport, text_from_hf_bert, vision_from_timm
from pipeline.runtime.io import read_state_dict

__all__ = [
    "WeightLoadError",
    "load_vision_init",
    "load_text_init",
    "init_from_pretrained",
]

logger = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightLoadError(RuntimeError):
    """Weights did not load completely: missing/unexpected keys beyond what the caller allowed."""


def _load_checked(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    report: ConversionReport,
    what: str,
    allowed_missing: Iterable[str] = (),
) -> ConversionReport:
    allowed = tuple(allowed_missing)
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed) and not any(f".{a}" in k for a in allowed)]
    if missing or result.unexpected_keys or report.unexpected:
        raise WeightLoadError(
            f"{what}: missing keys {missing}; unexpected keys "
            f"{sorted(set(result.unexpected_keys) | set(report.unexpected))}"
        )
    logger.info("%s loaded: %s", what, report.summary())
    if report.missing:
        logger.info(
            "%s: left at initialisation (allowed): %d keys, e.g. %s", what, len(report.missing), report.missing[:3]
        )
    return report


def load_vision_init(model: ALBEF, source: str | Path) -> ConversionReport:
    """ViT init (the paper: DeiT-B/16) from a local checkpoint file or a timm model name (timm may download).

    Loads into `model.visual_encoder` only; call `model.copy_params()` afterwards (see init_from_pretrained).
    """
    if Path(source).is_file():
        state = read_state_dict(source)
    else:
        logger.info("creating timm model %r with pretrained weights", source)
        state = timm.create_model(str(source), pretrained=True).state_dict()
    converted, report = vision_from_timm(state, model.config.vision, strict=False)
    return _load_checked(model.visual_encoder, converted, report, f"vision init {source}")


def _hf_bert_state(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if path.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path} has none of {_HF_WEIGHT_FILES}")
    if path.is_file():
        return read_state_dict(path)
    logger.info("loading HF model %r (may download)", str(source))
    return BertForMaskedLM.from_pretrained(str(source)).state_dict()


def load_text_init(model: ALBEF, source: str | Path, *, allow_missing_mlm_head: bool = False) -> ConversionReport:
    """BERT init (the paper: bert-base-uncased) from an HF model dir, a weights file or an HF model name.

    Every layer N of the checkpoint fills our layer N (text and fusion); cross-attention is new and stays
    at its initialisation. A checkpoint without the MLM head (a plain `BertModel`) is an error unless
    `allow_missing_mlm_head`. Loads into `model.text_encoder` only; call `model.copy_params()` afterwards.
    """
    converted, report = text_from_hf_bert(_hf_bert_state(source), model.config.text, strict=False)
    allowed = ["crossattention."] + (["cls."] if allow_missing_mlm_head else [])
    return _load_checked(model.text_encoder, converted, report, f"text init {source}", allowed)


def init_from_pretrained(
    model: ALBEF, *, vision: str | Path | None, text: str | Path | None, allow_missing_mlm_head: bool = False
) -> dict[str, ConversionReport]:
    """The official initialisation: DeiT into the ViT, BERT into text+fusion, then momentum <- trained."""
    reports = {}
    if vision is not None:
        reports["vision"] = load_vision_init(model, vision)
    if text is not None:
        reports["text"] = load_text_init(model, text, allow_missing_mlm_head=allow_missing_mlm_head)
    model.copy_params()
    return reports
