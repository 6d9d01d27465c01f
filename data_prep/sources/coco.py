"""MS-COCO through the Karpathy split file `dataset_coco.json` (5 captions per image).

`--split train` is train + restval (113K images), as ALBEF trains; val and test are 5K each.
Images come from COCO's public host (http://images.cocodataset.org/<filepath>/<filename>, the
`coco_url` of the official annotations) or from `--image_root` (a local copy -> file:// URLs, or
another http(s) mirror with the same layout). An entry whose `filepath/filename` escapes the root
(absolute, `..`, a symlink pointing out of a local root) is skipped and counted (`outside_image_root`).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.options import PrepOptions
from data_prep.records import SourceRows
from data_prep.sources._karpathy import build_image_root, read_karpathy

COCO_IMAGE_HOST = "http://images.cocodataset.org"
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.split is not None  # parse_options requires it for coco
    root = build_image_root(opts.image_root, COCO_IMAGE_HOST)
    return read_karpathy(path, SPLITS[opts.split], root, id_key="cocoid")
