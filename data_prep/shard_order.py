"""Put every finished shard's samples in key order, so that one input list always gives the same shards.

Why: img2dataset writes a shard's samples in the order their downloads finish, which changes from run to
run with more than one download thread. The loader's shuffle is seeded, but it shuffles whatever order it
is fed, so two preps of the same list trained two different runs. Keys are assigned from the input row order, so
sorting by key gives a deterministic order; a sample's own members (.jpg, .json, .txt) keep theirs.

Rewriting a shard streams it member by member (memory bounded by one image) into a temporary file that is
renamed over the shard, so an interrupted sort leaves the shard as it was; an already sorted shard is
only read through its headers.
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

SORTING_SUFFIX = ".sorting"  # the temporary file of a shard being rewritten


def sample_key(member_name: str) -> str:
    """WebDataset's grouping key: the file name up to its first dot (`000000042.jpg` -> `000000042`)."""
    directory, _, base = member_name.rpartition("/")
    return f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]


def sort_shard(path: Path) -> bool:
    """Rewrite the tar at `path` with its samples in key order; False when it already was (nothing written)."""
    with tarfile.open(path) as src:
        members = src.getmembers()
        order = sorted(range(len(members)), key=lambda i: (sample_key(members[i].name), i))
        if order == list(range(len(members))):
            return False
        tmp = path.with_name(path.name + SORTING_SUFFIX)
        with tarfile.open(tmp, "w", format=src.format) as dst:
            for i in order:
                member = members[i]
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    os.replace(tmp, path)
    return True


def sort_shards(shards_dir: Path) -> int:
    """Key-order every finished shard (one with a stats file) in `shards_dir`; returns how many were rewritten."""
    for stale in shards_dir.glob(f"*.tar{SORTING_SUFFIX}"):
        stale.unlink()  # left by a sort that was interrupted; its shard is intact
    rewritten = 0
    for stats in sorted(shards_dir.glob("*_stats.json")):
        tar = shards_dir / f"{stats.name.split('_')[0]}.tar"
        if tar.is_file() and sort_shard(tar):
            rewritten += 1
    if rewritten:
        logger.info("put the samples of %d shards in key order (%s)", rewritten, shards_dir)
    return rewritten
