"""Fixtures of the pipeline tests (helpers in pipeline_testutils.py, importable from every subfolder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline_testutils import make_shards, make_synthetic_splits


@pytest.fixture
def synthetic_splits(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Factory: `synthetic_splits(n_train=..., n_test=...)` -> {split: prep folder} under tmp_path."""

    def make(**kwargs: object) -> dict[str, Path]:
        return make_synthetic_splits(tmp_path / "splits", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def train_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `train_shards(n_train=..., per_shard=...)` -> one learnable training prep folder."""

    def make(**kwargs: object) -> Path:
        return make_shards(tmp_path / "shards", **kwargs)  # type: ignore[arg-type]

    return make
