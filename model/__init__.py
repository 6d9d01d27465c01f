"""ALBEF in pure torch (+ timm's ViT): configs, encoders, the pretraining model, losses, converters."""

from model.albef import ALBEF, PretrainOutput, build_albef
from model.config import ALBEFConfig, TextConfig, VisionConfig, config_from_dict, config_from_official
from model.distributed import all_gather_no_grad
from model.masking import mask_tokens

__all__ = [
    "ALBEF",
    "PretrainOutput",
    "build_albef",
    "ALBEFConfig",
    "TextConfig",
    "VisionConfig",
    "config_from_dict",
    "config_from_official",
    "all_gather_no_grad",
    "mask_tokens",
]
