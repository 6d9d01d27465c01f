"""Any list of image URLs and captions: parquet, TSV, CSV (with a header row), JSON or JSONL.

Columns are named by `--url_col` / `--caption_col` (and optionally `--id_col`). A caption cell
may hold one string or a list of strings (e.g. ALBEF-style json). A URL seen again is skipped and
counted, or with `--duplicate_urls merge` its captions join the first row's: one caption per row
files (COCO-style exports) then still download each image once.

URLs must be http(s): a file:// URL or a bare path in the list is skipped and counted
(`bad_url_scheme`). Local images need `--image_root FOLDER`: the URL column then holds names
relative to that folder (http(s) URLs in it are still fetched as such), and a name that escapes the
folder (absolute, `..`, a symlink pointing out) is skipped and counted (`outside_image_root`).
In text formats a row that is not valid UTF-8 is skipped and counted (`not_utf8`); a JSON file is
parsed whole, so there a bad byte is an error naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.image_root import ImageRoot
from data_prep.options import GENERIC_FORMATS, PrepOptions
from data_prep.records import RowCollector, SourceRows, progress, read_lines, require_file, url_scheme
from data_prep.sources._json import columns_to_records, load_json

Record = tuple[str, dict[str, Any] | None]  # (where, row); None: the row is not valid UTF-8


def read(path: Path, opts: PrepOptions) -> SourceRows:
    require_file(path, "--input")
    fmt = opts.input_format or _format_from_name(path)
    root = ImageRoot(opts.image_root) if opts.image_root is not None else None
    records = {"parquet": _parquet, "tsv": _delimited, "csv": _delimited, "json": _json, "jsonl": _jsonl}[fmt]
    columns = [opts.url_col, opts.caption_col] + ([opts.id_col] if opts.id_col else [])
    collector = RowCollector(duplicate_urls=opts.duplicate_urls)  # type: ignore[arg-type]
    for where, row in records(path, fmt, columns):
        if row is None:
            collector.skip_row("not_utf8", where)
            continue
        missing = [c for c in columns if c not in row]
        if missing:
            raise PrepInputError(where, f"missing column(s) {missing}; present: {sorted(row)}")
        image_id = row[opts.id_col] if opts.id_col else None
        url, captions = row[opts.url_col], row[opts.caption_col]
        if root is not None and isinstance(url, str) and not url_scheme(url.strip()):
            collector.add_named(root, url, captions, image_id, where=where)
        else:
            collector.add(url, captions, image_id, where=where)
    return collector.result()


def _format_from_name(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in GENERIC_FORMATS:
        return suffix
    raise PrepOptionsError(f"cannot tell the format of {path} from its extension; pass --input_format")


def _parquet(path: Path, fmt: str, columns: list[str]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    schema_names = pq.read_schema(path).names
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise PrepInputError(str(path), f"missing column(s) {missing}; present: {schema_names}")
    table = pq.read_table(path, columns=columns)
    for i, row in enumerate(progress(table.to_pylist(), f"reading {path.name}")):
        yield f"{path}: row {i}", row


def _delimited(path: Path, fmt: str, columns: list[str]) -> Iterator[Record]:
    """CSV with the csv module's quoting; TSV split on tabs only (captions may contain quotes).

    A header that is not valid UTF-8 is an error (the columns are unknown); a later row is
    yielded as None.
    """
    if fmt == "csv":
        # surrogateescape: a bad byte becomes a lone surrogate we can spot per record, instead of a
        # UnicodeDecodeError that would end the whole file (a quoted field may span lines).
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if not all(map(_is_utf8, header)):
                raise PrepInputError(f"{path}:{reader.line_num}", "header is not valid UTF-8")
            for fields in reader:
                if all(map(_is_utf8, fields)):
                    yield _zip_fields(path, reader.line_num, header, fields)
                else:
                    yield f"{path}:{reader.line_num}", None
        return
    lines = read_lines(path, "--input")
    first = next(lines, None)
    if first is None:
        return
    if first[1] is None:
        raise PrepInputError(f"{path}:1", "header is not valid UTF-8")
    header = first[1].split("\t")
    for lineno, line in lines:
        if line is None:
            yield f"{path}:{lineno}", None
        else:
            yield _zip_fields(path, lineno, header, line.split("\t"))


def _is_utf8(text: str) -> bool:
    """False when `text` holds a byte that surrogateescape decoding could not decode as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _zip_fields(path: Path, lineno: int, header: list[str], fields: list[str]) -> Record:
    if len(fields) != len(header):
        raise PrepInputError(f"{path}:{lineno}", f"expected {len(header)} columns (as the header), found {len(fields)}")
    return f"{path}:{lineno}", dict(zip(header, fields))


def _json(path: Path, fmt: str, columns: list[str]) -> Iterator[Record]:
    data = load_json(path, "--input")
    if isinstance(data, dict):  # column-wise {"url": [...], "caption": [...]}
        data = list(columns_to_records(path, data, tuple(columns)))
    if not isinstance(data, list):
        raise PrepInputError(
            str(path), f"expected a list of objects or an object of column lists, got {type(data).__name__}"
        )
    for i, row in enumerate(progress(data, f"reading {path.name}")):
        if not isinstance(row, dict):
            raise PrepInputError(f"{path}: entry {i}", f"expected an object, got {type(row).__name__}")
        yield f"{path}: entry {i}", row


def _jsonl(path: Path, fmt: str, columns: list[str]) -> Iterator[Record]:
    for lineno, line in read_lines(path, "--input"):
        if line is None:
            yield f"{path}:{lineno}", None
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepInputError(f"{path}:{lineno}", f"invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise PrepInputError(f"{path}:{lineno}", f"expected an object, got {type(row).__name__}")
        yield f"{path}:{lineno}", row
