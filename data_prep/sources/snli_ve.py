"""SNLI-VE (visual entailment): premise = a Flickr30k image, hypothesis = a sentence, 3-way label.

Input, one record per (image, hypothesis), either
- the SNLI-VE release `snli_ve_{train,dev,test}.jsonl`: one JSON object per line with
  `Flickr30K_ID` (e.g. "3416050480"), `sentence2` (the hypothesis), `gold_label`
  (entailment / neutral / contradiction); other keys (sentence1 = the Flickr caption, pairID...)
  are ignored; or
- the official ALBEF `ve_{train,dev,test}.json`: a JSON list of {"image": id, "sentence", "label"}.
Images are local Flickr30k files: `--image_root FOLDER` holds `<id>.jpg` (or an http(s) base URL
serving the same names).

Output: one sample per image (so ~30K downloads for the 530K train pairs), whose json carries
`captions` = its hypotheses (raw; the loader cleans them as captions) and `labels` = their gold
labels as strings, aligned index by index. Records are skipped and counted when the label is not one
of the three (`bad_label`, e.g. SNLI's "-" for no consensus) or the hypothesis is empty
(`empty_caption`); a repeated (image, hypothesis, label) is kept (the official set has a few). An
image id whose file name escapes --image_root skips that image once (`outside_image_root`), with all
its hypotheses; `input_rows` counts records (image-hypothesis pairs), not images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError
from data_prep.image_root import ImageRoot
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, read_lines, require_file
from data_prep.sources._json import load_json

LABELS = ("contradiction", "neutral", "entailment")  # the official label ids 0, 1, 2 follow this order
# (image id, hypothesis, label) keys of the two layouts
_SNLI_VE_KEYS = ("Flickr30K_ID", "sentence2", "gold_label")
_ALBEF_KEYS = ("image", "sentence", "label")


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.image_root is not None  # parse_options requires it for snli_ve
    root = ImageRoot(opts.image_root)
    collector = RowCollector()
    grouped: dict[str, tuple[str, list[str], list[str]]] = {}  # image id -> (first where, hypotheses, labels)
    skipped_records = 0
    for where, record in _records(path):
        if record is None:
            collector.skip("not_utf8", where)
            skipped_records += 1
            continue
        keys = _SNLI_VE_KEYS if _SNLI_VE_KEYS[0] in record else _ALBEF_KEYS
        missing = [k for k in keys if k not in record]
        if missing:
            raise PrepInputError(where, f"missing key(s) {missing}; expected {_SNLI_VE_KEYS} or {_ALBEF_KEYS}")
        image_id = _image_id(record[keys[0]], where)
        hypothesis, label = record[keys[1]], record[keys[2]]
        if not isinstance(hypothesis, str):
            raise PrepInputError(where, f"hypothesis must be a string, got {type(hypothesis).__name__}")
        if label not in LABELS:
            collector.skip("bad_label", where)
            skipped_records += 1
            continue
        if not hypothesis.strip():
            collector.skip("empty_caption", where)
            skipped_records += 1
            continue
        entry = grouped.setdefault(image_id, (where, [], []))
        entry[1].append(hypothesis.strip())
        entry[2].append(label)
    for image_id, (where, hypotheses, labels) in grouped.items():
        collector.add_named(root, f"{image_id}.jpg", hypotheses, image_id, where=where, extra={"labels": labels})
    result = collector.result()
    # input_rows counts the native records (image-hypothesis pairs), not the grouped images.
    result.input_rows = skipped_records + sum(len(h) for _, h, _ in grouped.values())
    return result


def _image_id(value: Any, where: str) -> str:
    """The Flickr30k id as a string: "123", 123 and "123.jpg" all give "123"."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PrepInputError(where, f"image id must be a string or an integer, got {value!r}")
    text = str(value).strip().removesuffix(".jpg")
    if not text:
        raise PrepInputError(where, "empty image id")
    return text


def _records(path: Path):
    """(where, record or None when the line is not UTF-8) from a .json list or a .jsonl file."""
    require_file(path, "--input")
    if path.suffix.lower() == ".json":
        data = load_json(path, "--input (ALBEF ve json)")
        if not isinstance(data, list):
            raise PrepInputError(str(path), f"expected a list of objects, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise PrepInputError(f"{path}: entry {i}", f"expected an object, got {type(record).__name__}")
            yield f"{path}: entry {i}", record
        return
    for lineno, line in read_lines(path, "--input"):
        where = f"{path}:{lineno}"
        if line is None:
            yield where, None
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepInputError(where, f"invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise PrepInputError(where, f"expected an object, got {type(record).__name__}")
        yield where, record
