"""NLVR2 (natural language for visual reasoning): one sentence about a PAIR of images, true or false.

Input, one record per (left image, right image, sentence), either
- the NLVR2 release `{train,dev,test1}.json`: JSON lines with `identifier` ("dev-850-0-1": split,
  set, pair, sentence), `sentence`, `label` ("True" / "False") and, for train, `directory` (the
  sub-folder "0".."99" of the train images); other keys (urls, writer, synset...) are ignored. The
  images are named after the identifier without its sentence number: `<split>/[<directory>/]
  <split>-<set>-<pair>-img0.png` (left) and `...-img1.png` (right), as the release's image archives
  unpack; or
- the official ALBEF `nlvr_{train,dev,test}.json`: a JSON list of {"images": [left, right],
  "sentence", "label"} with image names relative to the image root.
Images are local files under `--image_root FOLDER` (or an http(s) base URL serving the same names).

An image appears in several records (each NLVR2 image pair carries a few sentences, and the images
of a set are reused across its pairs), so it is downloaded once: the reader's rows are the distinct
images (their captions: the sentences that mention them; image_id: the name). The records are kept
as `PairRows.pairs`; after img2dataset, data_prep.pairs joins them with the downloaded images into
the training samples (two images each). Records whose label is not "True"/"False" (`bad_label`) or
whose sentence is empty (`empty_caption`) are skipped and counted; an image name outside the root
counts `outside_image_root` for its record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError
from data_prep.image_root import ImageRoot
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, read_lines, require_file
from data_prep.sources._json import load_json

LABELS = ("False", "True")  # the official label ids 0, 1 follow this order


@dataclass(frozen=True)
class Pair:
    """One NLVR2 record: the sentence is `label` about (left, right), image names as in the rows' image_id."""

    identifier: str
    left: str
    right: str
    sentence: str
    label: str  # "True" / "False"
    where: str  # file:line of the record (skip examples)


@dataclass
class PairRows(SourceRows):
    """SourceRows of the distinct images, plus the records that pair them (joined after download)."""

    pairs: list[Pair] = field(default_factory=list)


def read(path: Path, opts: PrepOptions) -> PairRows:
    assert opts.image_root is not None  # parse_options requires it for nlvr2
    root = ImageRoot(opts.image_root)
    collector = RowCollector()
    pairs: list[Pair] = []
    sentences: dict[str, tuple[str, list[str]]] = {}  # image name -> (first where, sentences)
    skipped_records = 0
    for index, (where, record) in enumerate(_records(path)):
        if record is None:
            collector.skip("not_utf8", where)
            skipped_records += 1
            continue
        pair = _pair(record, index, where)
        if pair.label not in LABELS:
            collector.skip("bad_label", where)
        elif not pair.sentence:
            collector.skip("empty_caption", where)
        elif root.url(pair.left) is None or root.url(pair.right) is None:
            collector.skip("outside_image_root", where)
        else:
            pairs.append(pair)
            for name in (pair.left, pair.right):
                sentences.setdefault(name, (where, []))[1].append(pair.sentence)
            continue
        skipped_records += 1
    for name, (where, texts) in sentences.items():
        collector.add_named(root, name, texts, name, where=where)
    images = collector.result()
    return PairRows(
        rows=images.rows,
        input_rows=skipped_records + len(pairs),  # native records, not images
        skipped=images.skipped,
        skipped_examples=images.skipped_examples,
        pairs=pairs,
    )


def image_names(identifier: str, directory: object | None) -> tuple[str, str]:
    """Left and right image names of an NLVR2 release record ("dev-850-0-1" -> dev/dev-850-0-img0.png, ...)."""
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    stem = "-".join(parts[:3])
    folder = parts[0] if directory is None else f"{parts[0]}/{directory}"
    return f"{folder}/{stem}-img0.png", f"{folder}/{stem}-img1.png"


def _pair(record: dict[str, Any], index: int, where: str) -> Pair:
    """A Pair from either layout; malformed records raise PrepInputError naming the location."""
    sentence, label = record.get("sentence"), record.get("label")
    if not isinstance(sentence, str):
        raise PrepInputError(where, f"`sentence` must be a string, got {sentence!r}")
    if isinstance(label, bool):  # a json true/false: the release writes strings, accept both
        label = str(label)
    if not isinstance(label, str):
        raise PrepInputError(where, f"`label` must be 'True' or 'False', got {label!r}")
    if "images" in record:
        images = record["images"]
        if not (isinstance(images, list) and len(images) == 2 and all(isinstance(x, str) and x for x in images)):
            raise PrepInputError(where, f"`images` must be a list of two image names, got {images!r}")
        left, right = images
        identifier = str(record.get("identifier", f"nlvr-{index}"))
    elif "identifier" in record:
        identifier = str(record["identifier"])
        try:
            left, right = image_names(identifier, record.get("directory"))
        except ValueError as err:
            raise PrepInputError(where, str(err)) from None
    else:
        raise PrepInputError(where, "expected `identifier` (NLVR2 release) or `images` (ALBEF nlvr json)")
    return Pair(identifier, left, right, sentence.strip(), label, where)


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(where, record or None when the line is not UTF-8) from a .json list or a json-lines file.

    The release's files end in .json but hold one object per line: a file is a list when its
    first non-blank character is `[`.
    """
    require_file(path, "--input")
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        data = load_json(path, "--input (ALBEF nlvr json)")
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
