"""Helpers for the retrieval tests: synthetic train/test shards in the `albef prep` contract format.

Shards are written with webdataset's TarWriter from data_prep.synthetic's coloured-shape scenes
(captions describe colour, shape, size and position; the test split's captions never occur in
train), as `albef prep` would lay them out; img2dataset itself is covered by the data tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds


def write_split(root: Path, images: list, images_dir: Path, split: str, per_shard: int = 64) -> Path:
    """`root/shards/NNNNN.tar` + `root/manifest.json` for `images` (SyntheticImage list)."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(0, len(images), per_shard):
        chunk, shard = images[s : s + per_shard], s // per_shard
        name = f"shards/{shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, im in enumerate(chunk):
                meta = {"captions": list(im.captions), "image_id": im.image_id, "status": "success"}
                sink.write(
                    {
                        "__key__": f"{shard:05d}{k:04d}",
                        "jpg": (images_dir / im.relpath).read_bytes(),
                        "txt": im.captions[0].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        entries.append({"path": name, "samples": len(chunk)})
    manifest = {
        "format_version": 1,
        "source": "synthetic",
        "split": split,
        "shards": entries,
        "num_samples": len(images),
        "num_captions": sum(len(im.captions) for im in images),
        "input_rows": len(images),
        "skipped": {},
        "failures": {},
        "successes": len(images),
        "settings": {},
        "elapsed_s": 0.0,
        "created": "1970-01-01T00:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_synthetic_splits(
    root: Path,
    *,
    n_train: int = 256,
    n_val: int = 0,
    n_test: int = 64,
    image_size: int = 64,
    captions_per_image: int = 3,
    seed: int = 0,
) -> dict[str, Path]:
    """Generate the synthetic set once and write one `albef prep`-style folder per split."""
    from data_prep.synthetic import write_synthetic

    raw = root / "raw"
    synth = write_synthetic(
        raw,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
        image_size=image_size,
        captions_per_image=captions_per_image,
    )
    return {
        split: write_split(root / split, synth.split(split), raw, split)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test))
        if n > 0
    }
