"""Fixtures for model tests: the official-code oracle (config, outputs) and a model loaded from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import ALBEF, ALBEFConfig

from albef_testutils import load_oracle_model, oracle_config


@pytest.fixture(scope="session")
def oracle_cfg(oracle_dir: Path) -> ALBEFConfig:
    return oracle_config(oracle_dir)


@pytest.fixture(scope="session")
def oracle_outputs(oracle_dir: Path) -> dict:
    return torch.load(oracle_dir / "albef_outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def oracle_model(oracle_dir: Path) -> ALBEF:
    """Shared read-only model: tests that mutate state must call `load_oracle_model` themselves."""
    return load_oracle_model(oracle_dir)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and other test processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
