"""manifest.json: what a prep output folder holds, from img2dataset's per-shard stats and parquets.

Rows the readers skipped are counted per reason in `skipped`, with the first few locations of each
("file:line") in `skipped_examples`; images img2dataset could not fetch or decode are counted per
cause in `failures` (e.g. `MAX_PIXELS_REASON` for a decompression bomb).

The loader sizes epochs and mixes sources from this file alone, so it is rebuilt from what is on
disk after every run (a resumed run included) and written atomically: a reader sees the old
manifest or the new one, never half of one.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data_prep.records import SourceRows

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"  # in every prep output folder, beside img2dataset's shards/
FORMAT_VERSION = 1
SHARD_DIGITS = 5  # img2dataset's oom_shard_count default: shard names 00000.tar, 00001.tar, ...
MAX_REASONS = 50  # distinct failure reasons kept; the rest are summed under "other"
MAX_PIXELS_REASON = "image larger than max_pixels"  # width*height over --max_pixels, refused before decoding


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def normalize_reason(message: str | None) -> str:
    """Collapse per-URL details so failures group by cause.

    img2dataset's messages embed object addresses ("<_io.BytesIO object at 0x7f..>") and the
    URL or path ("unknown url type: '/x.jpg'"); both would make every failure its own reason.
    OpenCV's refusal of an image over the pixel limit (`data_prep.img2ds`) becomes
    `MAX_PIXELS_REASON`.
    """
    text = message or "unknown"
    if "CV_IO_MAX_IMAGE_PIXELS" in text:
        return MAX_PIXELS_REASON
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    return text.strip()


@dataclass
class ShardSummary:
    """One finished shard: samples in its tar, and its rows' outcomes from its parquet."""

    shard_id: int
    samples: int
    count: int
    captions: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)


def read_shard(shards_dir: Path, shard_id: int) -> ShardSummary | None:
    """Summary of a finished shard, or None when it is not finished (no stats file)."""
    stats_path = shards_dir / f"{shard_name(shard_id)}_stats.json"
    if not stats_path.is_file():
        return None
    stats = json.loads(stats_path.read_text())
    summary = ShardSummary(shard_id=shard_id, samples=int(stats["successes"]), count=int(stats["count"]))
    table = pq.read_table(
        shards_dir / f"{shard_name(shard_id)}.parquet", columns=["status", "error_message", "captions"]
    )
    successes = 0
    for status, error, captions in zip(*(table.column(c).to_pylist() for c in ("status", "error_message", "captions"))):
        if status == "success":
            successes += 1
            summary.captions += len(captions)
        else:
            summary.failures[normalize_reason(error)] += 1
    if successes != summary.samples:
        logger.warning("shard %s: stats say %d successes, its parquet %d", shard_id, summary.samples, successes)
    return summary


def build_manifest(
    out_dir: Path,
    shards_dir: Path,
    *,
    source: str,
    split: str | None,
    rows: SourceRows,
    expected_shards: int,
    settings: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    """The manifest of the contract, plus `complete`/`missing_shards` for interrupted outputs."""
    shards, missing = [], []
    failures: collections.Counter[str] = collections.Counter()
    num_samples = num_captions = 0
    for shard_id in range(expected_shards):
        summary = read_shard(shards_dir, shard_id)
        if summary is None:
            missing.append(shard_id)
            continue
        tar = (shards_dir / f"{shard_name(shard_id)}.tar").relative_to(out_dir)
        shards.append({"path": tar.as_posix(), "samples": summary.samples})
        num_samples += summary.samples
        num_captions += summary.captions
        failures.update(summary.failures)
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "split": split,
        "shards": shards,
        "num_samples": num_samples,
        "num_captions": num_captions,
        "input_rows": rows.input_rows,
        "download_rows": len(rows.rows),
        "skipped": dict(rows.skipped),
        "skipped_examples": {reason: list(where) for reason, where in rows.skipped_examples.items()},
        "successes": num_samples,
        "failures": _capped(failures),
        "complete": not missing,
        "missing_shards": missing,
        "settings": settings,
        "elapsed_s": round(elapsed_s, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _capped(counter: collections.Counter[str]) -> dict[str, int]:
    kept = dict(counter.most_common(MAX_REASONS))
    rest = sum(counter.values()) - sum(kept.values())
    if rest:
        kept["other"] = kept.get("other", 0) + rest
    return dict(sorted(kept.items()))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load a manifest, checking the format version this code writes."""
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest
