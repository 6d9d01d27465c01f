"""Checks the stages share, run before anything is written (ConfigError naming the key)."""

from __future__ import annotations

import warnings

import torch

from model.config import ALBEFConfig
from model.retrieval import build_retrieval, load_retrieval_state
from pipeline.config import ConfigError
from pipeline.runtime.io import LoadedCheckpoint


def check_retrieval_weights(loaded: LoadedCheckpoint, model_config: ALBEFConfig, key: str = "checkpoint") -> None:
    """The checkpoint's weights load into the retrieval model of `model_config` (keys and shapes,
    on the meta device: no memory, no compute), or ConfigError(key) saying what does not fit."""
    if not loaded.state_dict:
        raise ConfigError(key, f"{loaded.source}: holds no tensors")
    try:
        with torch.device("meta"):
            shell = build_retrieval(model_config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
            load_retrieval_state(shell, loaded.state_dict)
    except (ValueError, RuntimeError) as err:
        one_line = " ".join(str(err).split())[:500] or type(err).__name__
        raise ConfigError(key, f"{loaded.source}: {one_line}") from None
