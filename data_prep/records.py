"""Rows grouped per image, and the skip-and-count rules every source reader shares.

Every reader turns its native file into `ImageRow`s (one per image to download: url, all its raw
captions, an image id) through one `RowCollector`, so the rules are identical across sources:
- an empty URL is malformed input: a `PrepInputError` naming the file and line;
- a URL whose scheme is not http/https/file is skipped and counted (`bad_url_scheme`): img2dataset
  cannot fetch bare paths or other schemes, it would only record a failure per row;
- empty captions are dropped and counted (`empty_caption`); an image left with none is skipped
  (a multi-caption image left with none is also counted as `no_caption_left`);
- a URL already seen is skipped and counted (`duplicate_url`), or its captions merged into the
  first row when the source is one-caption-per-row and the user asked for `duplicate_urls=merge`.
Captions are kept raw (only surrounding whitespace is stripped): cleaning belongs to the loader.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from tqdm import tqdm

from data_prep.errors import PrepInputError

ALLOWED_SCHEMES = ("http", "https", "file")
DuplicatePolicy = Literal["skip", "merge"]
T = TypeVar("T")


@dataclass(slots=True)  # slots: a web-scale list holds millions of these in memory
class ImageRow:
    """One image to download with every caption it has."""

    url: str
    captions: list[str]
    image_id: str


@dataclass
class SourceRows:
    """What a reader produced: rows to download, native records read, and what was skipped why."""

    rows: list[ImageRow]
    input_rows: int
    skipped: dict[str, int] = field(default_factory=dict)


def url_image_id(url: str) -> str:
    """A stable id for sources without one: 16 hex digits of the URL's SHA-1 (URLs are unique here)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def url_scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


class RowCollector:
    """Accumulates rows with the shared validation, grouping and counting rules (module docstring)."""

    def __init__(self, duplicate_urls: DuplicatePolicy = "skip") -> None:
        if duplicate_urls not in ("skip", "merge"):
            raise ValueError(f"duplicate_urls must be 'skip' or 'merge', got {duplicate_urls!r}")
        self.duplicate_urls = duplicate_urls
        self.rows: list[ImageRow] = []
        self.skipped: collections.Counter[str] = collections.Counter()
        self.input_rows = 0
        self._row_by_url: dict[str, ImageRow] = {}
        self._ids: set[str] = set()

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def add(self, url: object, captions: Iterable[object] | object, image_id: str | None, *, where: str) -> None:
        """Add one native record (counted in `input_rows`).

        Args:
            url: the image URL as read (non-str values are malformed input).
            captions: one caption or a list of them (None/empty entries are dropped and counted).
            image_id: the source's own id, or None to derive one from the URL.
            where: "file:line" (or "file: entry N") for error messages.
        """
        self.input_rows += 1
        if url is None or (isinstance(url, float) and url != url):  # None / pandas-style NaN
            url = ""
        if not isinstance(url, str):
            raise PrepInputError(where, f"URL must be a string, got {type(url).__name__} {url!r}")
        url = url.strip()
        if not url:
            raise PrepInputError(where, "empty URL")
        if url_scheme(url) not in ALLOWED_SCHEMES:
            self.skip("bad_url_scheme")
            return
        kept = self._clean_captions(captions, where)
        if not kept:
            return
        seen = self._row_by_url.get(url)
        if seen is not None:
            if self.duplicate_urls == "merge":
                seen.captions.extend(kept)
            else:
                self.skip("duplicate_url")
            return
        image_id = url_image_id(url) if image_id is None else str(image_id)
        if image_id in self._ids:
            self.skip("duplicate_image_id")
            return
        row = ImageRow(url=url, captions=kept, image_id=image_id)
        self._row_by_url[url] = row
        self._ids.add(image_id)
        self.rows.append(row)

    def _clean_captions(self, captions: Iterable[object] | object, where: str) -> list[str]:
        single = captions is None or isinstance(captions, str)
        if single:
            captions = [captions]
        kept: list[str] = []
        for caption in captions:  # type: ignore[union-attr]
            if caption is None or (isinstance(caption, float) and caption != caption):
                caption = ""
            if not isinstance(caption, str):
                raise PrepInputError(where, f"caption must be a string, got {type(caption).__name__} {caption!r}")
            caption = caption.strip()
            if caption:
                kept.append(caption)
            else:
                self.skip("empty_caption")
        if not kept and not single:  # a one-caption row is already counted as empty_caption
            self.skip("no_caption_left")
        return kept

    def result(self) -> SourceRows:
        return SourceRows(rows=self.rows, input_rows=self.input_rows, skipped=dict(sorted(self.skipped.items())))


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar for the reading img2dataset does not cover (hidden when not on a terminal)."""
    yield from tqdm(items, desc=desc, total=total, unit=" rows", disable=None)


def require_file(path: Path, what: str) -> Path:
    """Fail early with the flag's name when an input file is missing."""
    if not path.is_file():
        raise PrepInputError(str(path), f"{what} not found")
    return path


def iter_text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for a UTF-8 text file, with a progress bar.

    Decoding errors become `PrepInputError`s naming the line, not a bare UnicodeDecodeError.
    """
    require_file(path, what)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(tqdm(f, desc=f"reading {path.name}", unit=" lines", disable=None), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PrepInputError(f"{path}:{lineno}", f"not valid UTF-8 ({err.reason})") from None
            yield lineno, line.rstrip("\r\n")


def split_fields(path: Path, lineno: int, line: str, expected: int, delimiter: str = "\t") -> list[str]:
    """Split a delimiter-separated line, failing with file:line when the column count is wrong."""
    fields = line.split(delimiter)
    if len(fields) != expected:
        raise PrepInputError(
            f"{path}:{lineno}", f"expected {expected} {delimiter!r}-separated columns, found {len(fields)}"
        )
    return fields
