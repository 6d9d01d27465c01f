"""Fixtures of the task-model tests: one official-code task folder each (ALBEF_HEADS_DIR)."""

from __future__ import annotations

from pathlib import Path

import pytest

from heads_testutils import TaskFixture, load_task_fixture


@pytest.fixture(scope="session")
def retrieval_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "retrieval")


@pytest.fixture(scope="session")
def ve_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "ve")


@pytest.fixture(scope="session")
def nlvr_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "nlvr")


@pytest.fixture(scope="session")
def nlvr_ta_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "nlvr_ta")


@pytest.fixture(scope="session")
def vqa_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "vqa")


@pytest.fixture(scope="session")
def grounding_fx(heads_dir: Path) -> TaskFixture:
    return load_task_fixture(heads_dir, "grounding")
