"""One reader per source: native list file(s) -> `SourceRows` (rows grouped per image).

Each reader takes the `--input` path and the validated `PrepOptions` and applies the shared
rules of `data_prep.records.RowCollector`. `READERS` maps the `albef prep SOURCE` name to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_prep.options import PrepOptions
from data_prep.records import SourceRows
from data_prep.sources import cc3m, cc12m, coco, flickr30k, generic, nlvr2, refcoco, sbu, snli_ve, vg, vqa

Reader = Callable[[Path, PrepOptions], SourceRows]

READERS: dict[str, Reader] = {
    "cc3m": cc3m.read,
    "cc12m": cc12m.read,
    "sbu": sbu.read,
    "coco": coco.read,
    "vg": vg.read,
    "flickr30k": flickr30k.read,
    "generic": generic.read,
    "snli_ve": snli_ve.read,
    "vqa": vqa.read,
    "nlvr2": nlvr2.read,
    "refcoco+": refcoco.read,
}

# Files a source writes beside the shards from its rows (after the rows are read, before the download).
SideFiles = Callable[[SourceRows, PrepOptions, Path], object]
SIDE_FILES: dict[str, SideFiles] = {"vqa": vqa.write_answer_list}
