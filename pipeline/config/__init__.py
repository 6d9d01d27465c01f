"""Typed configs: the strict loader, the shared sections, the model-config builder, repo paths."""

from pipeline.config.loader import (
    ConfigError,
    apply_overrides,
    check,
    coerce,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
    to_yaml,
    validate_sections,
)
from pipeline.config.model import build_model_config
from pipeline.config.paths import (
    CONFIG_DIR,
    REPO_ROOT,
    SLURM_TEMPLATE_DIR,
    resolve_config_file,
    resolve_path,
)
from pipeline.config.sections import (
    DataConfig,
    DeepSpeedSection,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainingStageConfig,
)

__all__ = [
    "CONFIG_DIR",
    "REPO_ROOT",
    "SLURM_TEMPLATE_DIR",
    "ConfigError",
    "DataConfig",
    "DeepSpeedSection",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainingStageConfig",
    "apply_overrides",
    "build_model_config",
    "check",
    "coerce",
    "from_dict",
    "load_config",
    "read_yaml",
    "resolve_config_file",
    "resolve_path",
    "to_dict",
    "to_yaml",
    "validate_sections",
]
