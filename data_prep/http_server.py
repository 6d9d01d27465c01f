"""A tiny threaded HTTP server on 127.0.0.1 that serves a folder, for tests and the offline demo.

Why not `python -m http.server`: the tests must prove that a resumed prep run does not fetch
finished shards again, so the server counts requests per path, and it must mix failures into a
run on demand (forced 404s), and optionally answer slowly so a run can be interrupted partway.
It binds to the loopback interface only and picks a free port when `port=0`.
"""

from __future__ import annotations

import collections
import functools
import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the folder, counting each GET and honouring forced 404s / delay."""

    server: _CountingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = unquote(urlsplit(self.path).path)
        self.server.record(path)
        if self.server.delay_s > 0:
            time.sleep(self.server.delay_s)
        if path in self.server.forced_404:
            self.send_error(404, "File not found")
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        logger.debug("http %s: " + format, self.address_string(), *args)


class _CountingHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: Callable[..., Any], forced_404: set[str], delay_s: float
    ) -> None:
        super().__init__(address, handler)
        self.forced_404 = forced_404
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self, path: str) -> None:
        with self._lock:
            self.counts[path] += 1


class FolderServer:
    """Serve `root` over HTTP on 127.0.0.1 in a background thread.

    Usage:
        with FolderServer(folder, not_found=["/missing.jpg"]) as server:
            url = server.url("a.jpg")          # http://127.0.0.1:PORT/a.jpg
            ...
            server.request_count("/a.jpg")     # how many GETs that path received

    Args:
        root: folder whose files are served (paths map directly under it).
        port: TCP port; 0 picks a free one.
        not_found: URL paths ("/x.jpg") answered with 404 even if the file exists.
        delay_s: seconds each GET waits before answering (lets a test stop a run partway).
    """

    def __init__(self, root: str | Path, port: int = 0, not_found: Iterable[str] = (), delay_s: float = 0.0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"FolderServer: {self.root} is not a folder")
        handler = functools.partial(_Handler, directory=str(self.root))
        forced = {p if p.startswith("/") else "/" + p for p in not_found}
        self._server = _CountingHTTPServer(("127.0.0.1", port), handler, forced, delay_s)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, relpath: str) -> str:
        """The URL of a file given its path relative to the served folder."""
        return f"{self.base_url}/{relpath.lstrip('/')}"

    def set_not_found(self, paths: Iterable[str]) -> None:
        """Replace the set of paths forced to answer 404."""
        self._server.forced_404 = {p if p.startswith("/") else "/" + p for p in paths}

    def set_delay(self, delay_s: float) -> None:
        self._server.delay_s = delay_s

    def request_count(self, path: str) -> int:
        """GETs received for a URL path (leading slash optional)."""
        path = path if path.startswith("/") else "/" + path
        with self._server._lock:
            return self._server.counts[path]

    def request_counts(self) -> dict[str, int]:
        with self._server._lock:
            return dict(self._server.counts)

    def reset_counts(self) -> None:
        with self._server._lock:
            self._server.counts.clear()

    def start(self) -> FolderServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="FolderServer", daemon=True)
        self._thread.start()
        logger.info("serving %s at %s", self.root, self.base_url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FolderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
