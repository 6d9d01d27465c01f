"""Conceptual 12M: `cc12m.tsv` with `url<TAB>caption` lines, no header."""

from __future__ import annotations

from pathlib import Path

from data_prep.options import PrepOptions
from data_prep.records import SourceRows
from data_prep.sources._tsv import read_pair_tsv


def read(path: Path, opts: PrepOptions) -> SourceRows:
    """One image per line; image ids derive from the URL (the file has none)."""
    return read_pair_tsv(path, opts, url_index=0, header=("url", "caption"))
