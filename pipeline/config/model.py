"""The experiment's `model` section -> the model's own `ALBEFConfig` (one builder for every stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.config import ALBEFConfig
from pipeline.config.loader import ConfigError

if TYPE_CHECKING:
    from pipeline.config.sections import ModelConfig

# ALBEFConfig attribute path -> field of the experiment's `model` section (same name when absent).
_SECTION_FIELD = {"vision.image_size": "image_res"}


def build_model_config(section: ModelConfig, seed: int, prefix: str = "model") -> ALBEFConfig:
    """ALBEFConfig of the preset with the section's head settings; the queue starts from `seed`.

    The model validates its own ranges; a failure is re-raised as a ConfigError naming the
    section's key (`model.image_res`, `model.temp`...).
    """
    preset = ALBEFConfig.tiny if section.preset == "tiny" else ALBEFConfig.base
    try:
        return preset(
            image_size=section.image_res,
            embed_dim=section.embed_dim,
            queue_size=section.queue_size,
            momentum=section.momentum,
            temp=section.temp,
            mlm_probability=section.mlm_probability,
            momentum_dropout=section.momentum_dropout,
            itm_negatives=section.itm_negatives,
            queue_seed=seed,
        )
    except ValueError as err:
        attr = getattr(err, "field", None)
        name = _SECTION_FIELD.get(attr, attr) if attr else None
        raise ConfigError(f"{prefix}.{name}" if name else prefix, str(err)) from None
