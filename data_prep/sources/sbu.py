"""SBU Captioned Photos: `sbu-captions-all.json` or the older URL + caption txt pair.

- json: column-wise {"image_urls": [...], "captions": [...], "user_ids": [...]} as distributed
  (a list of {"image_url"/"url", "caption"} records is accepted too);
- txt pair: `SBU_captioned_photo_dataset_urls.txt` (--input) and `..._captions.txt` (--captions_file,
  default: the input name with "urls" -> "captions"), line i of one belongs to line i of the other;
  a line of either that is not valid UTF-8 skips that pair (`not_utf8`).
URLs must be http(s) (`data_prep.records`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import PrepInputError
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, progress, read_lines
from data_prep.sources._json import columns_to_records, load_json, require_key


def read(path: Path, opts: PrepOptions) -> SourceRows:
    collector = RowCollector(duplicate_urls=opts.duplicate_urls)  # type: ignore[arg-type]
    if path.suffix.lower() == ".txt":
        _read_txt_pair(path, _captions_path(path, opts), collector)
    else:
        _read_json(path, collector)
    return collector.result()


def _captions_path(urls_path: Path, opts: PrepOptions) -> Path:
    if opts.captions_file is not None:
        return Path(opts.captions_file)
    if "urls" not in urls_path.name:
        raise PrepInputError(
            str(urls_path), "cannot derive the captions file name (no 'urls' in it); pass --captions_file"
        )
    return urls_path.with_name(urls_path.name.replace("urls", "captions"))


def _read_txt_pair(urls_path: Path, captions_path: Path, collector: RowCollector) -> None:
    urls = read_lines(urls_path, "--input (SBU urls .txt)")
    captions = read_lines(captions_path, "SBU captions file (--captions_file)")
    for lineno, url, caption in _paired(urls, captions, urls_path, captions_path):
        if url is None or caption is None:  # a line that is not valid UTF-8 spoils its pair only
            collector.skip_row("not_utf8", f"{urls_path if url is None else captions_path}:{lineno}")
            continue
        collector.add(url, caption, None, where=f"{urls_path}:{lineno}")


def _paired(
    urls: Iterator[tuple[int, str | None]],
    captions: Iterator[tuple[int, str | None]],
    urls_path: Path,
    captions_path: Path,
) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, URL line, caption line): line i of one file with line i of the other.

    Raises:
        PrepInputError: when the files' line counts differ.
    """
    for lineno, (url_line, caption_line) in enumerate(itertools.zip_longest(urls, captions), start=1):
        if url_line is None or caption_line is None:
            short, long = (urls_path, captions_path) if url_line is None else (captions_path, urls_path)
            raise PrepInputError(
                f"{long}:{lineno}", f"no matching line in {short} (it has {lineno - 1}): line counts differ"
            )
        yield lineno, url_line[1], caption_line[1]


def _read_json(path: Path, collector: RowCollector) -> None:
    data = load_json(path, "--input (sbu-captions-all.json)")
    if isinstance(data, dict):
        entries = columns_to_records(path, data, ("image_urls", "captions"))
        url_key, caption_key = "image_urls", "captions"
    elif isinstance(data, list):
        entries = iter(data)
        first = data[0] if data and isinstance(data[0], dict) else {}
        url_key = "image_url" if "image_url" in first else "url"
        caption_key = "caption"
    else:
        raise PrepInputError(str(path), f"expected a JSON object of column lists or a list, got {type(data).__name__}")
    for i, entry in enumerate(progress(entries, f"reading {path.name}")):
        url = require_key(path, i, entry, url_key)
        collector.add(url, require_key(path, i, entry, caption_key), None, where=f"{path}: entry {i}")
