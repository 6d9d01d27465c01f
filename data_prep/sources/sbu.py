"""SBU Captioned Photos: `sbu-captions-all.json` or the older URL + caption txt pair.

- json: column-wise {"image_urls": [...], "captions": [...], "user_ids": [...]} as distributed
  (a list of {"image_url"/"url", "caption"} records is accepted too);
- txt pair: `SBU_captioned_photo_dataset_urls.txt` (--input) and `..._captions.txt` (--captions_file,
  default: the input name with "urls" -> "captions"), line i of one belongs to line i of the other.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from data_prep.errors import PrepInputError
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, iter_text_lines, progress, require_file
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
    require_file(captions_path, "SBU captions file (--captions_file)")
    urls = iter_text_lines(urls_path, "--input (SBU urls .txt)")
    with open(captions_path, encoding="utf-8", errors="strict") as captions:
        for lineno, (url_line, caption) in enumerate(itertools.zip_longest(urls, captions), start=1):
            if url_line is None or caption is None:
                short, long = (urls_path, captions_path) if url_line is None else (captions_path, urls_path)
                raise PrepInputError(
                    f"{long}:{lineno}", f"no matching line in {short} (it has {lineno - 1}): line counts differ"
                )
            collector.add(url_line[1], caption.rstrip("\r\n"), None, where=f"{urls_path}:{lineno}")


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
