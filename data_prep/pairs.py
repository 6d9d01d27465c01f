"""The join step of two-image sources (NLVR2): downloaded images + pair records -> pair shards.

img2dataset downloads each distinct image once into `DIR/shards/` (one sample per image, its json
carrying the image name as `image_id`). This step then writes the training samples, one per record,
into `DIR/pairs/NNNNN.tar`:
    <key>.left.jpg, <key>.right.jpg   the two images' bytes, as img2dataset stored them (no re-encode)
    <key>.json                         {"identifier", "captions": [sentence], "labels": [label],
                                        "image_id": identifier, "images": [left name, right name]}
A record whose left or right image is not in the shards (missing file, download or decode failure)
is skipped and counted as `missing_image` (its first locations in `skipped_examples`).

Images are found by a header-only index of the image tars ((tar, offset, size) per image name) and
read with one seek each, so memory holds the index, not the images. The pair shards are written
to a temporary name and renamed; `DIR/pairs/state.json` (written last) records what they were built
from, so a re-run with the same inputs and finished downloads skips the join, and anything else
rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

from data_prep.manifest import shard_name, write_json_atomic
from data_prep.records import MAX_EXAMPLES
from data_prep.sources.nlvr2 import Pair

logger = logging.getLogger(__name__)

PAIRS_DIR = "pairs"
STATE_NAME = "state.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

ImageIndex = dict[str, tuple[Path, int, int, str]]  # image name -> (tar, data offset, size, extension)


def index_images(tars: Sequence[Path]) -> ImageIndex:
    """Where each downloaded image's bytes are, by the image name in its sample's json (`image_id`)."""
    index: ImageIndex = {}
    for tar in tars:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isfile() and "." in info.name:
                    key, ext = info.name.split(".", 1)
                    members.setdefault(key, {})[ext] = info
            for parts in members.values():
                image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if image_ext is None or "json" not in parts:
                    continue
                handle = tf.extractfile(parts["json"])
                assert handle is not None
                name = json.loads(handle.read()).get("image_id")
                info = parts[image_ext]
                if isinstance(name, str):
                    index[name] = (tar, info.offset_data, info.size, image_ext)
    return index


def _read(entry: tuple[Path, int, int, str]) -> bytes:
    tar, offset, size, _ = entry
    with open(tar, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _fingerprint(pairs: Sequence[Pair], image_tars: Sequence[Path], samples_per_shard: int) -> str:
    h = hashlib.sha256(str(samples_per_shard).encode())
    for tar in image_tars:
        st = tar.stat()
        h.update(f"{tar.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for p in pairs:
        h.update(json.dumps([p.identifier, p.left, p.right, p.sentence, p.label]).encode() + b"\n")
    return h.hexdigest()


def join_pairs(out_dir: Path, image_tars: Sequence[Path], pairs: Sequence[Pair], samples_per_shard: int) -> dict:
    """Write (or keep, when up to date) DIR/pairs/*.tar; returns {"shards": [{"path", "samples"}],
    "num_pairs", "skipped": {"missing_image": n}, "skipped_examples"} (paths relative to DIR)."""
    pairs_dir = out_dir / PAIRS_DIR
    state_path = pairs_dir / STATE_NAME
    fingerprint = _fingerprint(pairs, image_tars, samples_per_shard)
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = {}
        if state.get("fingerprint") == fingerprint:
            logger.info("pair shards in %s are up to date; nothing to join", pairs_dir)
            return state["result"]
        state_path.unlink()
    pairs_dir.mkdir(parents=True, exist_ok=True)
    for old in pairs_dir.glob("*.tar"):
        old.unlink()
    index = index_images(image_tars)
    kept = [p for p in pairs if p.left in index and p.right in index]
    missing = [p for p in pairs if not (p.left in index and p.right in index)]
    shards = []
    for start in range(0, len(kept), samples_per_shard):
        chunk = kept[start : start + samples_per_shard]
        name = f"{PAIRS_DIR}/{shard_name(start // samples_per_shard)}.tar"
        tmp = out_dir / f"{name}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for k, pair in enumerate(chunk):
                meta = {
                    "identifier": pair.identifier,
                    "captions": [pair.sentence],
                    "labels": [pair.label],
                    "image_id": pair.identifier,
                    "images": [pair.left, pair.right],
                }
                sink.write(
                    {
                        "__key__": f"{start + k:09d}",
                        f"left.{index[pair.left][3]}": _read(index[pair.left]),
                        f"right.{index[pair.right][3]}": _read(index[pair.right]),
                        "json": json.dumps(meta).encode(),
                    }
                )
        os.replace(tmp, out_dir / name)
        shards.append({"path": name, "samples": len(chunk)})
    result: dict[str, Any] = {
        "shards": shards,
        "num_pairs": len(kept),
        "skipped": {"missing_image": len(missing)} if missing else {},
        "skipped_examples": {"missing_image": [p.where for p in missing[:MAX_EXAMPLES]]} if missing else {},
    }
    write_json_atomic(state_path, {"fingerprint": fingerprint, "result": result})
    logger.info("joined %d pairs into %d shards; %d skipped (missing image)", len(kept), len(shards), len(missing))
    return result


def pair_manifest(image_manifest: dict[str, Any], joined: dict[str, Any]) -> dict[str, Any]:
    """The folder's manifest: the pair shards for the loader, the image download under `images`.

    `num_samples` / `num_captions` count the pairs (one sentence each); `input_rows` the records;
    `skipped` adds the joined-out records (`missing_image`) to the reader's skips.
    """
    skipped = Counter(image_manifest["skipped"])
    skipped.update(joined["skipped"])
    examples = {**image_manifest["skipped_examples"], **joined["skipped_examples"]}
    images = {k: image_manifest[k] for k in ("shards", "num_samples", "download_rows", "successes", "failures")}
    return {
        **image_manifest,
        "shards": joined["shards"],
        "num_samples": joined["num_pairs"],
        "num_captions": joined["num_pairs"],
        "successes": joined["num_pairs"],
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "images": images,
        "sample_layout": "pair",
    }
