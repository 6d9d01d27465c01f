"""Fixtures of the data_prep tests: one served media folder for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_prep.http_server import FolderServer

from prep_testutils import FORCED_404, make_media


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_media(tmp_path_factory.mktemp("media"))
    for sub in ("train2014", "val2014"):  # COCO's layout, for the Karpathy filepath
        os.symlink(root, root / sub)
    return root


@pytest.fixture(scope="session")
def server(media_dir: Path) -> Iterator[FolderServer]:
    not_found = FORCED_404 + [f"/{sub}{p}" for sub in ("train2014", "val2014") for p in FORCED_404]
    with FolderServer(media_dir, not_found=not_found) as srv:
        yield srv
