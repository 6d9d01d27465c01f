"""Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`) shared by coco and flickr30k.

Layout: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...], ...}]}.
One row per image of the chosen split with all its raw sentences, so each image downloads once.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.image_root import ImageRoot
from data_prep.records import RowCollector, SourceRows, progress
from data_prep.sources._json import load_json, require_key


def build_image_root(image_root: str | None, default_base: str | None) -> ImageRoot:
    """The `--image_root` (local folder or http(s) base URL), or the source's public host."""
    root = image_root if image_root is not None else default_base
    if root is None:
        raise PrepOptionsError("--image_root is required (a local image folder or an http(s) base URL)")
    return ImageRoot(root)


def read_karpathy(
    path: Path,
    splits: Collection[str],
    root: ImageRoot,
    id_key: str | None,
) -> SourceRows:
    """Rows for the images whose "split" is in `splits`; `input_rows` counts those images.

    Args:
        root: where "<filepath>/<filename>" resolves; an entry whose name escapes it (absolute,
            `..`, a symlink out of a local root) is skipped and counted (`outside_image_root`).
        id_key: the entry key holding the image id ("cocoid"); None uses the file name's stem.
    """
    data = load_json(path, "--input (Karpathy split json)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepInputError(str(path), "expected a Karpathy split file: an object with an 'images' list")
    collector = RowCollector()
    for i, image in enumerate(progress(data["images"], f"reading {path.name}")):
        split = require_key(path, i, image, "split", "images entry")
        if split not in splits:
            continue
        sentences = require_key(path, i, image, "sentences", "images entry")
        if not isinstance(sentences, list):
            raise PrepInputError(f"{path}: images entry {i}", "'sentences' must be a list")
        captions = [require_key(path, i, s, "raw", "sentence of images entry") for s in sentences]
        filename = require_key(path, i, image, "filename", "images entry")
        folder = image.get("filepath") or ""
        name = f"{folder}/{filename}" if folder else filename
        image_id = Path(filename).stem if id_key is None else require_key(path, i, image, id_key, "images entry")
        collector.add_named(root, name, captions, str(image_id), where=f"{path}: images entry {i}")
    return collector.result()
