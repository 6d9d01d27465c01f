"""Fixtures of the pipeline tests (helpers in pipeline_testutils.py, importable from every subfolder)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from pipeline_testutils import make_shards, make_synthetic_splits, pretrain_cmd, run_cli


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Stages call setup_logging (basicConfig force=True) in-process: drop the handler it installs.

    Only pytest's own capture handlers may stay on the root logger: they come and go with each test
    phase, so re-attaching a snapshot would keep handlers whose capture stream is already closed."""
    root = logging.getLogger()
    level = root.level
    yield
    root.handlers[:] = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Two busy cores shared with other jobs: one intra-op thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 2-step CPU pretraining run through the CLI (fp32 weights, 32 px): {'run', 'train', 'test'}.
    Under ZeRO-2 (`ds_configs/cpu_zero2.json`), so that its tag holds an optimizer partition file as GPU
    runs do (the shipped CPU configs run without ZeRO). Read-only for tests: copy it before changing anything."""
    root = tmp_path_factory.mktemp("tiny_run")
    splits = make_synthetic_splits(root / "splits", n_train=32, n_test=16, image_size=32)
    cmd = pretrain_cmd(
        root / "run",
        splits["train"],
        "--train.max_steps=2",
        "--train.save_every_steps=2",
        "--deepspeed.config=ds_configs/cpu_zero2.json",
    )
    proc = run_cli([*cmd[3:], "--model.image_res=32", "--data.num_workers=0"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {"run": root / "run", "train": splits["train"], "test": splits["test"]}
