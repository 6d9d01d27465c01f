"""Reading initial and official weights from files/names into an ALBEF model (the file side of model/convert.py).

Every load goes: read -> pure converter (rename table, pos-embed resampling, shape asserts) -> non-strict
load -> our own check that nothing is missing except what the caller declared acceptable, with missing and
unexpected keys reported separately. The classic ALBEF failure was DeiT weights silently not loading
(Flickr TR@1 82 instead of 94), so anything unexplained raises `WeightLoadError`.

Pretraining reads and converts its initial weights in two steps so that every problem with them is a
start-up error: `read_initial_weights` (the stage's check phase: file or hub read, conversion and shape
checks, before anything is written) and `apply_initial_weights` (build_model: load + momentum copy).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn
from transformers import BertForMaskedLM

from model.albef import ALBEF
from model.config import ALBEFConfig
from model.convert import ConversionReport, text_from_hf_bert, vision_from_timm
from pipeline.runtime.io import read_state_dict

__all__ = [
    "InitialWeights",
    "WeightLoadError",
    "WeightSourceError",
    "apply_initial_weights",
    "init_from_pretrained",
    "load_text_init",
    "load_vision_init",
    "read_initial_weights",
    "weight_source_kind",
]

logger = logging.getLogger(__name__)

Which = Literal["vision", "text"]

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz")
# An HF hub repo id: `name` or `org/name` (no leading '/', '.', '~': those are paths).
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class WeightLoadError(RuntimeError):
    """Weights did not load completely: missing/unexpected keys beyond what the caller allowed."""


class WeightSourceError(ValueError):
    """An initial-weights source that cannot be used; `which` is "vision" or "text"."""

    def __init__(self, which: Which, message: str) -> None:
        super().__init__(message)
        self.which = which


def weight_source_kind(which: Which, source: str | Path) -> Literal["local", "hub"]:
    """Whether `source` is a local file (or, for text, an HF model folder) or a hub name; reads nothing.

    Vision: a checkpoint file or a timm model name (`deit_base_patch16_224`, tags allowed). Text: an HF
    model folder, a weights file or an HF repo id (`bert-base-uncased`, `org/name`). Anything else (a
    path that does not exist) raises WeightSourceError.
    """
    path = Path(source).expanduser()
    if path.is_file() or (which == "text" and path.is_dir()):
        return "local"
    name = str(source)
    if path.is_dir():
        raise WeightSourceError(which, f"{name} is a folder; expected a checkpoint file or a timm model name")
    if which == "vision" and timm.is_model(name):
        return "hub"
    looks_like_id = _HF_REPO_ID.fullmatch(name) is not None and not name.endswith(_WEIGHT_SUFFIXES)
    if which == "text" and looks_like_id:
        return "hub"
    what = "a timm model name" if which == "vision" else "an HF model name"
    raise WeightSourceError(which, f"not found: {name} (neither a local file nor {what})")


def read_vision_state(source: str | Path) -> dict[str, torch.Tensor]:
    """timm ViT state dict from a local checkpoint file or a timm model name (timm may download)."""
    if weight_source_kind("vision", source) == "local":
        return read_state_dict(Path(source).expanduser())
    logger.info("creating timm model %r with pretrained weights (may download)", str(source))
    return timm.create_model(str(source), pretrained=True).state_dict()


def read_text_state(source: str | Path) -> dict[str, torch.Tensor]:
    """HF BERT state dict from a model folder, a weights file or an HF model name (may download)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path} has none of {_HF_WEIGHT_FILES}")
    if weight_source_kind("text", source) == "local":
        return read_state_dict(path)
    logger.info("loading HF model %r (may download)", str(source))
    return BertForMaskedLM.from_pretrained(str(source)).state_dict()


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


def _text_allowed_missing(allow_missing_mlm_head: bool) -> list[str]:
    # Cross-attention is new in ALBEF (random init); a plain BertModel has no MLM head.
    return ["crossattention."] + (["cls."] if allow_missing_mlm_head else [])


def load_vision_init(model: ALBEF, source: str | Path) -> ConversionReport:
    """ViT init (the paper: DeiT-B/16) from a local checkpoint file or a timm model name (timm may download).

    Loads into `model.visual_encoder` only; call `model.copy_params()` afterwards (see init_from_pretrained).
    """
    converted, report = vision_from_timm(read_vision_state(source), model.config.vision, strict=False)
    return _load_checked(model.visual_encoder, converted, report, f"vision init {source}")


def load_text_init(model: ALBEF, source: str | Path, *, allow_missing_mlm_head: bool = False) -> ConversionReport:
    """BERT init (the paper: bert-base-uncased) from an HF model dir, a weights file or an HF model name.

    Every layer N of the checkpoint fills our layer N (text and fusion); cross-attention is new and stays
    at its initialisation. A checkpoint without the MLM head (a plain `BertModel`) is an error unless
    `allow_missing_mlm_head`. Loads into `model.text_encoder` only; call `model.copy_params()` afterwards.
    """
    converted, report = text_from_hf_bert(read_text_state(source), model.config.text, strict=False)
    allowed = _text_allowed_missing(allow_missing_mlm_head)
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


# --------------------------------------------------------------------------------------------------
# Read at start-up, apply at build time (pretraining)
# --------------------------------------------------------------------------------------------------


@dataclass
class InitialWeights:
    """Initial weights already read and converted to our layout (shapes checked against the config)."""

    sources: dict[str, str]  # "vision"/"text" -> the file, folder or hub name read
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # converted, per encoder
    reports: dict[str, ConversionReport] = field(default_factory=dict)
    allow_missing_mlm_head: bool = False


def read_initial_weights(
    config: ALBEFConfig,
    *,
    vision: str | Path | None,
    text: str | Path | None,
    allow_missing_mlm_head: bool = False,
) -> InitialWeights:
    """Read and convert the initial weights for a model of `config`, without building it.

    Raises WeightSourceError (naming "vision" or "text") for a missing file, an unreachable or unknown
    hub model, an unreadable file, keys the model does not know or a shape that does not fit, so the
    caller can refuse to start before it writes anything.
    """
    out = InitialWeights(sources={}, allow_missing_mlm_head=allow_missing_mlm_head)
    jobs: list[tuple[Which, str | Path | None]] = [("vision", vision), ("text", text)]
    for which, source in jobs:
        if source is None:
            continue
        try:
            if which == "vision":
                state, report = vision_from_timm(read_vision_state(source), config.vision, strict=True)
            else:
                state, report = text_from_hf_bert(read_text_state(source), config.text, strict=True)
        except WeightSourceError:
            raise
        except Exception as err:  # file, hub (HTTP, offline cache) and converter errors alike
            raise WeightSourceError(which, f"cannot use {source}: {type(err).__name__}: {err}") from err
        out.sources[which], out.states[which], out.reports[which] = str(source), state, report
        logger.info("%s init read from %s: %s", which, source, report.summary())
    return out


def apply_initial_weights(model: ALBEF, weights: InitialWeights) -> dict[str, ConversionReport]:
    """Load what `read_initial_weights` returned (strict key report), then momentum twins <- trained."""
    if "vision" in weights.states:
        _load_checked(
            model.visual_encoder,
            weights.states["vision"],
            weights.reports["vision"],
            f"vision init {weights.sources['vision']}",
        )
    if "text" in weights.states:
        _load_checked(
            model.text_encoder,
            weights.states["text"],
            weights.reports["text"],
            f"text init {weights.sources['text']}",
            _text_allowed_missing(weights.allow_missing_mlm_head),
        )
    model.copy_params()
    return dict(weights.reports)
