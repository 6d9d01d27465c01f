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
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"  # beside the checkout (CI has it; a web clone does not)
DEFAULT_ORACLE_DIR = SHARED_FIXTURES / "official_tiny"
DEFAULT_HEADS_DIR = SHARED_FIXTURES / "official_tiny_heads"


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def fixture_dir(variable: str, default: Path, marker: str) -> Path:
    """An official-code fixture folder: `$variable` or `default`, holding `marker`.

    Absent: the test is skipped with a reason naming the variable to set, unless
    ALBEF_REQUIRE_FIXTURES=1 (CI), where a missing fixture is a failure, never a silent skip.
    """
    path = Path(os.environ.get(variable, default))
    if not (path / marker).exists():
        message = f"official-code fixture not found at {path} (set {variable} to its folder)"
        if os.environ.get("ALBEF_REQUIRE_FIXTURES") == "1":
            pytest.fail(message + "; ALBEF_REQUIRE_FIXTURES=1 forbids skipping")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """The pretraining-model fixture of the official code (ALBEF_ORACLE_DIR)."""
    return fixture_dir("ALBEF_ORACLE_DIR", DEFAULT_ORACLE_DIR, "albef_outputs.pt")


@pytest.fixture(scope="session")
def heads_dir() -> Path:
    """The task-head fixtures of the official code (ALBEF_HEADS_DIR)."""
    return fixture_dir("ALBEF_HEADS_DIR", DEFAULT_HEADS_DIR, "README.md")
