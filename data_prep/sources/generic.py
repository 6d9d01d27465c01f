"""Any list of image URLs and captions: parquet, TSV, CSV (with a header row), JSON or JSONL.

Columns are named by `--url_col` / `--caption_col` (and optionally `--id_col`). A caption cell
may hold one string or a list of strings (e.g. ALBEF-style json). A URL seen again is skipped and
counted, or with `--duplicate_urls merge` its captions join the first row's: one caption per row
files (COCO-style exports) then still download each image once.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.options import GENERIC_FORMATS, PrepOptions
from data_prep.records import RowCollector, SourceRows, iter_text_lines, progress, require_file
from data_prep.sources._json import columns_to_records, load_json

Record = tuple[str, dict[str, Any]]  # (where, row)


def read(path: Path, opts: PrepOptions) -> SourceRows:
    fmt = opts.input_format or _format_from_name(path)
    require_file(path, "--input")
    records = {"parquet": _parquet, "tsv": _delimited, "csv": _delimited, "json": _json, "jsonl": _jsonl}[fmt]
    columns = [opts.url_col, opts.caption_col] + ([opts.id_col] if opts.id_col else [])
    collector = RowCollector(duplicate_urls=opts.duplicate_urls)  # type: ignore[arg-type]
    for where, row in records(path, fmt, columns):
        missing = [c for c in columns if c not in row]
        if missing:
            raise PrepInputError(where, f"missing column(s) {missing}; present: {sorted(row)}")
        image_id = row[opts.id_col] if opts.id_col else None
        collector.add(row[opts.url_col], row[opts.caption_col], image_id, where=where)
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
    """CSV with the csv module's quoting; TSV split on tabs only (captions may contain quotes)."""
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            for fields in reader:
                yield _zip_fields(path, reader.line_num, header, fields)
        return
    lines = iter_text_lines(path, "--input")
    first = next(lines, None)
    if first is None:
        return
    header = first[1].split("\t")
    for lineno, line in lines:
        yield _zip_fields(path, lineno, header, line.split("\t"))


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
    for lineno, line in iter_text_lines(path, "--input"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepInputError(f"{path}:{lineno}", f"invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise PrepInputError(f"{path}:{lineno}", f"expected an object, got {type(row).__name__}")
        yield f"{path}:{lineno}", row
