"""Shared test set-up: deterministic seeds, few threads, and the fixture directory."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ORACLE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "official_tiny"


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """The official-code fixture directory (override with ALBEF_ORACLE_DIR)."""
    path = Path(os.environ.get("ALBEF_ORACLE_DIR", DEFAULT_ORACLE_DIR))
    if not (path / "albef_outputs.pt").exists():
        pytest.fail(f"official fixture not found at {path} (set ALBEF_ORACLE_DIR)")
    return path
