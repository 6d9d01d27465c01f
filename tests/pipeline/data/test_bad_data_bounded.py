"""Bad data stays bounded: a truncated shard's lost samples count once per visit, and a stream
whose every sample is bad fails (naming the field and the shards) instead of searching forever.

Shards are written in tmp_path in the data_prep contract's format (see test_loaders.py).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import SkipCounter, TooManyBadSamples, build_train_loader
from pipeline.data.text import build_tokenizer, bundled_vocab_path

RES = 24


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _write_source(root: Path, shards: list[list[bytes]], listed: list[int] | None = None) -> Path:
    """One prep folder; shard i holds samples with the given image bytes (manifest lists `listed[i]`)."""
    (root / "shards").mkdir(parents=True)
    entries = []
    for i, images in enumerate(shards):
        with wds.TarWriter(str(root / "shards" / f"{i:05d}.tar")) as sink:
            for k, image in enumerate(images):
                meta = {"captions": [f"a picture number {k}"], "image_id": f"{i}-{k}", "status": "success"}
                sink.write({"__key__": f"{i:05d}{k:04d}", "jpg": image, "json": json.dumps(meta).encode()})
        entries.append({"path": f"shards/{i:05d}.tar", "samples": listed[i] if listed else len(images)})
    manifest = {
        "format_version": 1,
        "source": root.name,
        "split": "train",
        "shards": entries,
        "num_samples": sum(e["samples"] for e in entries),
        "num_captions": sum(e["samples"] for e in entries),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(bundled_vocab_path())


def _loader(folder: Path, tokenizer, **kw):
    args = dict(
        batch_size=2,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=3,
        start_step=0,
        image_res=RES,
        tokenizer=tokenizer,
        max_len=12,
        segment_steps=10,
        shuffle_buffer=0,
        pin_memory=False,
    )
    args.update(kw)
    return build_train_loader([folder], **args)


def test_truncated_shard_counts_its_lost_samples_once_per_visit(tmp_path: Path, tokenizer) -> None:
    rng = np.random.default_rng(0)
    folder = _write_source(tmp_path / "trunc", [[_jpeg(rng) for _ in range(8)], [_jpeg(rng) for _ in range(12)]])
    tar = folder / "shards" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # the manifest still lists 12

    steps, segment = 40, 10
    counts: Counter[str] = Counter()
    keys: list[str] = []
    for batch in _loader(folder, tokenizer, num_steps=steps, segment_steps=segment):
        counts.update(batch["bad_samples"])
        keys += batch["key"]
    from_cut = [k for k in keys if k.startswith("00001")]
    readable = len(set(from_cut))
    assert 0 < readable < 12
    visits = counts["bad_shard"]
    assert len(from_cut) > 2 * readable  # the cut shard was re-read several times within a visit ...
    assert 1 <= visits <= steps // segment  # ... but counts once per visit (one per segment stream at most)
    assert counts["lost_samples"] == visits * (12 - readable)  # its lost samples, once per visit
    assert sum(counts.values()) < len(keys)  # before: every re-read added its lost samples again


def test_skip_counter_caps_consecutive_skips_and_names_the_shards() -> None:
    counter = SkipCounter(max_consecutive=3)
    for _ in range(3):
        counter.add("bad_image", "x", shard="/d/shards/00000.tar", log=False)
    counter.kept()  # a good sample ends the run of skips
    for _ in range(3):
        counter.add("bad_image", "x", shard="/d/shards/00001.tar", log=False)
    with pytest.raises(TooManyBadSamples) as info:
        counter.shard_failed("/d/shards/00002.tar", 0, 50, "cut")
    message = str(info.value)
    assert message.startswith("data.max_consecutive_bad_samples: 4 samples in a row")
    assert "00001.tar" in message and "00002.tar" in message and "00000.tar" not in message
    assert counter.take() == {"bad_image": 6, "bad_shard": 1, "lost_samples": 50}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_all_bad_stream_fails_with_the_field_and_the_shards(tmp_path: Path, tokenizer, num_workers: int) -> None:
    folder = _write_source(tmp_path / "bad", [[b"not a jpeg"] * 5, [b"\xff\xd8 cut"] * 5])
    loader = _loader(folder, tokenizer, num_workers=num_workers, max_consecutive_bad=40)
    with pytest.raises(TooManyBadSamples) as info:
        next(iter(loader))
    line = TooManyBadSamples.one_line(info.value)  # from a worker, the message carries its traceback
    assert "\n" not in line and line.startswith("data.max_consecutive_bad_samples: 41 samples in a row")
    assert "bad_image 41" in line and str(folder / "shards" / "00000.tar") in line


def test_all_truncated_stream_fails_too(tmp_path: Path, tokenizer) -> None:
    """Shards that yield nothing at all: each failed read counts one skip, so the stream still ends."""
    folder = _write_source(tmp_path / "empty", [[], []], listed=[100, 100])
    with pytest.raises(TooManyBadSamples, match=r"bad_shard 21; limit 20\); shards: .*00000.tar"):
        next(iter(_loader(folder, tokenizer, max_consecutive_bad=20)))
