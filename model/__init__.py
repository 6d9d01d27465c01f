"""ALBEF in pure torch (+ timm's ViT): configs, encoders, the pretraining and retrieval models, losses,
converters."""

from model.albef import ALBEF, ALBEFBase, PretrainOutput, build_albef
from model.config import ALBEFConfig, ModelConfigError, TextConfig, VisionConfig, config_from_official
from model.distributed import all_gather_no_grad
from model.masking import mask_tokens
from model.retrieval import ALBEFRetrieval, RetrievalOutput, build_retrieval, load_retrieval_state

__all__ = [
    "ALBEF",
    "ALBEFBase",
    "PretrainOutput",
    "build_albef",
    "ALBEFRetrieval",
    "RetrievalOutput",
    "build_retrieval",
    "load_retrieval_state",
    "ALBEFConfig",
    "ModelConfigError",
    "TextConfig",
    "VisionConfig",
    "config_from_official",
    "all_gather_no_grad",
    "mask_tokens",
]
