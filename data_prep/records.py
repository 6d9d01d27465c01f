"""Rows grouped per image, and the skip-and-count rules every source reader shares.

Every reader turns its native file into `ImageRow`s (one per image to download: url, all its raw
captions, an image id) through one `RowCollector`, so the rules are identical across sources:
- a URL taken from a list must be http or https (`WEB_SCHEMES`); any other (file://, ftp://, gs://,
  data:, a bare path) is skipped and counted (`bad_url_scheme`). Lists come from the web: a
  `file:///etc/passwd` row must never make img2dataset read a local file;
- local files come only from an explicit `--image_root` (`RowCollector.add_named` with a
  `data_prep.image_root.ImageRoot`): a relative name is resolved under the root and the file:// URL
  is built by us; a name that escapes the root (absolute, `..`, a symlink pointing out) is skipped
  and counted (`outside_image_root`);
- a line of a text list that is not valid UTF-8 is skipped and counted (`not_utf8`), not fatal;
- an empty URL is malformed input: a `PrepInputError` naming the file and line;
- empty captions are dropped and counted (`empty_caption`); an image left with none is skipped
  (a multi-caption image left with none is also counted as `no_caption_left`);
- a URL already seen is skipped and counted (`duplicate_url`), or its captions merged into the
  first row when the source is one-caption-per-row and the user asked for `duplicate_urls=merge`.
Each skip reason also keeps the first `MAX_EXAMPLES` locations ("file:line" or "file: entry N"),
which the manifest reports as `skipped_examples`.
Captions are kept raw (only surrounding whitespace is stripped): cleaning belongs to the loader.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from tqdm import tqdm

from data_prep.errors import PrepInputError

if TYPE_CHECKING:
    from data_prep.image_root import ImageRoot

WEB_SCHEMES = ("http", "https")  # the only schemes accepted from a list; file:// is built from --image_root only
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986 scheme syntax
MAX_EXAMPLES = 5  # locations kept per skip reason
DuplicatePolicy = Literal["skip", "merge"]
T = TypeVar("T")


@dataclass(slots=True)  # slots: a web-scale list holds millions of these in memory
class ImageRow:
    """One image to download with every caption it has."""

    url: str
    captions: list[str]
    image_id: str
    # Per-caption annotations a task needs (e.g. SNLI-VE {"labels": [...]}, one entry per caption):
    # each key becomes a column of img2dataset's input and a key of every sample's json.
    extra: dict[str, list] | None = None


@dataclass
class SourceRows:
    """What a reader produced: rows to download, native records read, and what was skipped why."""

    rows: list[ImageRow]
    input_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first locations


def url_image_id(url: str) -> str:
    """A stable id for sources without one: 16 hex digits of the URL's SHA-1 (URLs are unique here)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def url_scheme(url: str) -> str:
    """The URL's scheme, lower-cased ("" for a bare path). `file:/x` and `data:...` have one too."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


class RowCollector:
    """Accumulates rows with the shared validation, grouping and counting rules (module docstring)."""

    def __init__(self, duplicate_urls: DuplicatePolicy = "skip") -> None:
        if duplicate_urls not in ("skip", "merge"):
            raise ValueError(f"duplicate_urls must be 'skip' or 'merge', got {duplicate_urls!r}")
        self.duplicate_urls = duplicate_urls
        self.rows: list[ImageRow] = []
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self.input_rows = 0
        self._row_by_url: dict[str, ImageRow] = {}
        self._ids: set[str] = set()

    def skip(self, reason: str, where: str | None = None, n: int = 1) -> None:
        """Count `n` skipped items under `reason`, remembering `where` among its first examples."""
        self.skipped[reason] += n
        if where is not None:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(where)

    def skip_row(self, reason: str, where: str) -> None:
        """Skip a whole native record (it still counts in `input_rows`)."""
        self.input_rows += 1
        self.skip(reason, where)

    def add(self, url: object, captions: Iterable[object] | object, image_id: str | None, *, where: str) -> None:
        """Add one native record whose URL comes from the list (counted in `input_rows`).

        Args:
            url: the image URL as read (non-str values are malformed input); only http(s) is used.
            captions: one caption or a list of them (None/empty entries are dropped and counted).
            image_id: the source's own id, or None to derive one from the URL.
            where: "file:line" (or "file: entry N") for error messages and skip examples.
        """
        self.input_rows += 1
        url = _required_str(url, "URL", where)
        if url_scheme(url) not in WEB_SCHEMES:
            self.skip("bad_url_scheme", where)
            return
        self._add_row(url, captions, image_id, where)

    def add_named(
        self,
        root: ImageRoot,
        name: object,
        captions: Iterable[object] | object,
        image_id: str | None,
        *,
        where: str,
        extra: dict[str, list] | None = None,
    ) -> None:
        """Like `add`, for an image given by its name relative to `root` (counted in `input_rows`).

        A name that escapes the root is skipped and counted as `outside_image_root`. `extra`
        (per-caption annotations, `ImageRow.extra`) needs captions the caller already checked
        non-empty, so that no caption is dropped and the lists stay aligned.
        """
        self.input_rows += 1
        url = root.url(_required_str(name, "image name", where))
        if url is None:
            self.skip("outside_image_root", where)
            return
        self._add_row(url, captions, image_id, where, extra)

    def _add_row(
        self,
        url: str,
        captions: Iterable[object] | object,
        image_id: str | None,
        where: str,
        extra: dict[str, list] | None = None,
    ) -> None:
        kept = self._clean_captions(captions, where)
        if not kept:
            return
        if extra is not None and any(len(v) != len(kept) for v in extra.values()):
            raise ValueError(f"{where}: per-caption annotations must align with the kept captions")
        seen = self._row_by_url.get(url)
        if seen is not None:
            if self.duplicate_urls == "merge":
                seen.captions.extend(kept)
            else:
                self.skip("duplicate_url", where)
            return
        image_id = url_image_id(url) if image_id is None else str(image_id)
        if image_id in self._ids:
            self.skip("duplicate_image_id", where)
            return
        row = ImageRow(url=url, captions=kept, image_id=image_id, extra=extra)
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
                self.skip("empty_caption", where)
        if not kept and not single:  # a one-caption row is already counted as empty_caption
            self.skip("no_caption_left", where)
        return kept

    def result(self) -> SourceRows:
        return SourceRows(
            rows=self.rows,
            input_rows=self.input_rows,
            skipped=dict(sorted(self.skipped.items())),
            skipped_examples={k: list(v) for k, v in sorted(self.examples.items())},
        )


def _required_str(value: object, what: str, where: str) -> str:
    """A stripped, non-empty string, or a `PrepInputError` (None and pandas-style NaN count as empty)."""
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    if not isinstance(value, str):
        raise PrepInputError(where, f"{what} must be a string, got {type(value).__name__} {value!r}")
    value = value.strip()
    if not value:
        raise PrepInputError(where, f"empty {what}")
    return value


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar for the reading img2dataset does not cover (hidden when not on a terminal)."""
    yield from tqdm(items, desc=desc, total=total, unit=" rows", disable=None)


def require_file(path: Path, what: str) -> Path:
    """Fail early, naming the flag, when an input is missing, a folder, or unreadable."""
    if path.is_dir():
        raise PrepInputError(str(path), f"{what} is a folder, not a file")
    if not path.is_file():
        raise PrepInputError(str(path), f"{what} not found")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise PrepInputError(str(path), f"{what} cannot be read ({err.strerror})") from None
    return path


def read_lines(path: Path, what: str) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, line without its newline) for a UTF-8 text file, with a progress bar.

    A line that is not valid UTF-8 comes as None, so a reader can skip and count that one row;
    `iter_text_lines` is the strict form.
    """
    require_file(path, what)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(tqdm(f, desc=f"reading {path.name}", unit=" lines", disable=None), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None
                continue
            yield lineno, line.rstrip("\r\n")


def iter_text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """`read_lines` for files where one bad line spoils the whole file (an exclusion list, a header).

    Raises:
        PrepInputError: naming the first line that is not valid UTF-8.
    """
    for lineno, line in read_lines(path, what):
        if line is None:
            raise PrepInputError(f"{path}:{lineno}", "not valid UTF-8")
        yield lineno, line


def split_fields(path: Path, lineno: int, line: str, expected: int, delimiter: str = "\t") -> list[str]:
    """Split a delimiter-separated line, failing with file:line when the column count is wrong."""
    fields = line.split(delimiter)
    if len(fields) != expected:
        raise PrepInputError(
            f"{path}:{lineno}", f"expected {expected} {delimiter!r}-separated columns, found {len(fields)}"
        )
    return fields
