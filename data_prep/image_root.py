"""`--image_root`: where the relative image names of a list resolve, and the only way to local files.

A root is either a local folder or an http(s) base URL. Given a name from the list, `ImageRoot.url`
returns the URL img2dataset fetches, or None when the name must not be used:
- an absolute name, or one with a `..` part, or a NUL byte (refused for URL roots too: a mirror
  should not be walked out of either);
- for a local root, a name that resolves outside the root once symlinks are followed (a symlink in
  the image folder pointing at /home or /etc).
A local file reaches img2dataset only as the file:// URL built here from the *resolved* path, so the
file checked is the file fetched; file:// URLs written in a list are never used (see
`data_prep.records.WEB_SCHEMES`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import quote

from data_prep.errors import PrepOptionsError
from data_prep.records import WEB_SCHEMES, url_scheme


class ImageRoot:
    """Turns relative image names into URLs under one root (module docstring).

    Args:
        root: a local folder (-> file:// URLs) or an http(s) base URL (-> base + "/" + quoted name).
    """

    def __init__(self, root: str) -> None:
        scheme = url_scheme(root)
        self.base: str | None = None
        self.folder: Path | None = None
        if scheme in WEB_SCHEMES:
            self.base = root.rstrip("/")
        elif scheme:
            raise PrepOptionsError(f"--image_root must be a local folder or an http(s) URL, got {root!r}")
        else:
            folder = Path(root).expanduser().resolve()
            if not folder.is_dir():
                raise PrepOptionsError(f"--image_root {root} is not a folder (nor an http(s) URL)")
            self.folder = folder

    def url(self, name: str) -> str | None:
        """The URL of `name` (relative to the root), or None when the name escapes the root."""
        parts = PurePosixPath(name).parts
        if "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts:
            return None
        if self.base is not None:
            return f"{self.base}/{quote(name)}"
        assert self.folder is not None
        try:
            path = (self.folder / name).resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            return None
        if not path.is_relative_to(self.folder):
            return None
        return path.as_uri()  # img2dataset needs file://, bare paths fail
