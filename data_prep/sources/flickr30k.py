"""Flickr30k through the Karpathy split file `dataset_flickr30k.json` plus a local image folder.

Flickr30k images are distributed as an archive, not URLs: `--image_root` is the folder of
`<filename>` JPEGs (file:// URLs) or an http(s) base URL serving the same names. Image ids are
the file names' stems (the Flickr photo ids). A file name that escapes the root (absolute, `..`, a
symlink pointing out of the folder) is skipped and counted (`outside_image_root`).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.options import PrepOptions
from data_prep.records import SourceRows
from data_prep.sources._karpathy import build_image_root, read_karpathy


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.split is not None  # parse_options requires it (and --image_root) for flickr30k
    root = build_image_root(opts.image_root, None)
    return read_karpathy(path, (opts.split,), root, id_key=None)
