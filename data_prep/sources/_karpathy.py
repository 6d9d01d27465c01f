"""Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`) shared by coco and flickr30k.

Layout: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...], ...}]}.
One row per image of the chosen split with all its raw sentences, so each image downloads once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from urllib.parse import quote

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.records import RowCollector, SourceRows, progress, url_scheme
from data_prep.sources._json import load_json, require_key


def image_url_maker(image_root: str | None, default_base: str | None) -> Callable[[str], str]:
    """Map an image's relative path to its URL: http(s) base URL, or local folder -> file:// URL."""
    root = image_root if image_root is not None else default_base
    if root is None:
        raise PrepOptionsError("--image_root is required (a local image folder or an http(s) base URL)")
    if url_scheme(root) in ("http", "https"):
        base = root.rstrip("/")
        return lambda relpath: f"{base}/{quote(relpath)}"
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise PrepOptionsError(f"--image_root {root} is not a folder (nor an http(s) URL)")
    return lambda relpath: (folder / relpath).as_uri()  # img2dataset needs file://, bare paths fail


def read_karpathy(
    path: Path,
    splits: Collection[str],
    make_url: Callable[[str], str],
    id_key: str | None,
) -> SourceRows:
    """Rows for the images whose "split" is in `splits`; `input_rows` counts those images.

    Args:
        make_url: relative image path ("<filepath>/<filename>") -> URL.
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
        relpath = f"{image.get('filepath', '')}/{filename}".lstrip("/")
        image_id = Path(filename).stem if id_key is None else require_key(path, i, image, id_key, "images entry")
        collector.add(make_url(relpath), captions, str(image_id), where=f"{path}: images entry {i}")
    return collector.result()
