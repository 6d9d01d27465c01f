"""Reading the shard manifests written by data_prep (the shared contract) and sizing epochs.

A manifest (`DIR/manifest.json`, format_version 1) lists the shards of one source with their
sample counts; paths are relative to DIR. The loader only trusts what the manifest says: the
counts size the epoch, weight the sources and tell a truncated shard from a complete one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME
from pipeline.config import check

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar file: absolute path, sample count from the manifest, index of its source."""

    url: str
    samples: int
    source: int


@dataclass(frozen=True)
class Source:
    """One manifest: a named set of shards and its sampling weight (relative, not normalised)."""

    name: str
    root: Path
    split: str | None
    shards: tuple[Shard, ...]
    num_samples: int
    num_captions: int
    weight: float


def manifest_path(path: str | Path) -> Path:
    """Accept either the manifest file or the folder holding it."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | Path) -> dict:
    """Load and validate one manifest; errors name the file and the offending key."""
    p = manifest_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{p}: not valid JSON ({exn})") from exn
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: format_version is {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    shards = data.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{p}: key 'shards' must be a list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("path"), str):
            raise ValueError(f"{p}: shards[{i}] needs a string 'path'")
        if not isinstance(shard.get("samples"), int) or shard["samples"] < 0:
            raise ValueError(f"{p}: shards[{i}].samples must be a non-negative int")
    return data


def _load_source(path: str | Path, index: int, weight: float | None) -> Source:
    p = manifest_path(path)
    data = read_manifest(p)
    root = p.parent
    shards = []
    for entry in data["shards"]:
        if entry["samples"] == 0:
            continue  # img2dataset writes empty shards when every URL of a shard failed
        url = root / entry["path"]
        if not url.is_file():
            raise FileNotFoundError(f"{p}: shard {entry['path']} does not exist ({url})")
        shards.append(Shard(str(url), entry["samples"], index))
    num_samples = sum(s.samples for s in shards)
    if num_samples == 0:
        raise ValueError(f"{p}: manifest lists no samples")
    # Every stored sample has at least one caption; a manifest without the count (or with 0) counts one each.
    num_captions = max(int(data.get("num_captions") or 0), num_samples)
    w = float(num_captions) if weight is None else float(weight)
    if not w > 0:
        raise ValueError(f"{p}: source weight must be > 0, got {weight!r}")
    return Source(
        name=str(data.get("source", root.name)),
        root=root,
        split=data.get("split"),
        shards=tuple(shards),
        num_samples=num_samples,
        num_captions=num_captions,
        weight=w,
    )


def load_sources(manifests: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[Source]:
    """Read every manifest; `weights` (one per manifest) default to the sources' image-caption pairs
    (num_captions): the official code samples captions uniformly, so a source's share is its pair count."""
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    if not manifests:
        raise ValueError("no manifests given")
    if weights is not None and len(weights) != len(manifests):
        raise ValueError(f"weights has {len(weights)} entries for {len(manifests)} manifests")
    sources = [_load_source(m, i, None if weights is None else weights[i]) for i, m in enumerate(manifests)]
    total_w = sum(s.weight for s in sources)
    for s in sources:
        logger.info(
            "source %s: %d shards, %d images, %d pairs, mixing weight %.3f",
            s.name,
            len(s.shards),
            s.num_samples,
            s.num_captions,
            s.weight / total_w,
        )
    return sources


def source_shares(sources: Sequence[Source]) -> list[float]:
    """Each source's probability of supplying a training sample: its weight over the total (sums to 1)."""
    total_w = sum(s.weight for s in sources)
    return [s.weight / total_w for s in sources]


def shard_distribution(sources: Sequence[Source]) -> tuple[list[Shard], list[float]]:
    """All shards and their draw probabilities: P(source) = its weight share, then by shard size.

    Drawing a shard with probability proportional to its sample count inside a source makes every
    sample of a source equally likely, whatever the shard sizes.
    """
    total_w = sum(s.weight for s in sources)
    shards, probs = [], []
    for s in sources:
        for shard in s.shards:
            shards.append(shard)
            probs.append(s.weight / total_w * shard.samples / s.num_samples)
    return shards, probs


def check_prep_folders(folders: Sequence[tuple[str, str | Path]]) -> None:
    """Each (config key, folder) is an `albef prep` output (holds a manifest); ConfigError naming the key."""
    for key, folder in folders:
        check(
            (Path(folder) / MANIFEST_NAME).is_file() or Path(folder).is_file(),
            key,
            f"no {MANIFEST_NAME} in {folder} (expected an `albef prep` output folder)",
        )
