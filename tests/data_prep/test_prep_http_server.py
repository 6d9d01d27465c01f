"""The test/demo HTTP server: serves a folder on 127.0.0.1, counts requests, forces 404s."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data_prep.http_server import FolderServer


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_serves_counts_and_forces_404(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"b")
    with FolderServer(tmp_path, not_found=["b.bin"]) as srv, FolderServer(tmp_path) as other:
        assert srv.port != other.port and srv.base_url.startswith("http://127.0.0.1:")
        assert _get(srv.url("sub/a.bin")) == (200, b"abc")
        assert _get(srv.url("/sub/a.bin?x=1")) == (200, b"abc")
        assert _get(srv.url("b.bin"))[0] == 404
        assert _get(srv.url("nothing.bin"))[0] == 404
        assert srv.request_counts() == {"/sub/a.bin": 2, "/b.bin": 1, "/nothing.bin": 1}
        assert srv.request_count("sub/a.bin") == 2 and other.request_counts() == {}
        srv.set_not_found([])
        assert _get(srv.url("b.bin")) == (200, b"b")
        srv.reset_counts()
        assert srv.request_counts() == {}
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url("b.bin"), timeout=2)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FolderServer(tmp_path / "nope")
