"""The paper's data sampling: epochs and default weights in image-caption pairs, and every batch a
sample-by-sample mix of the sources by weight, still a pure function of (seed, step, rank)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import build_train_loader, load_sources
from pipeline.data.manifest import source_shares
from pipeline.data.text import build_tokenizer, bundled_vocab_path

RES = 16
# source -> (shards, samples per shard, captions per sample)
LAYOUT = {"a": (2, 20, 1), "b": (1, 20, 5), "c": (3, 10, 2)}


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def _write_source(root: Path, name: str, rng: np.random.Generator) -> Path:
    n_shards, per_shard, n_caps = LAYOUT[name]
    (root / "shards").mkdir(parents=True)
    entries = []
    for s in range(n_shards):
        path = f"shards/{s:05d}.tar"
        with wds.TarWriter(str(root / path)) as sink:
            for k in range(per_shard):
                key = f"{name}{s:02d}{k:03d}"
                caps = [f"photo {j} of {name} number {k}" for j in range(n_caps)]
                meta = {"captions": caps, "image_id": key, "status": "success"}
                sink.write({"__key__": key, "jpg": _jpeg(rng), "json": json.dumps(meta).encode()})
        entries.append({"path": path, "samples": per_shard})
    manifest = {
        "format_version": 1,
        "source": name,
        "split": "train",
        "shards": entries,
        "num_samples": n_shards * per_shard,
        "num_captions": n_shards * per_shard * n_caps,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    return [_write_source(root / name, name, rng) for name in LAYOUT]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(bundled_vocab_path())


def _loader(sources: list[Path], tokenizer, **kw):
    args = dict(
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=3,
        start_step=0,
        image_res=RES,
        tokenizer=tokenizer,
        max_len=12,
        segment_steps=50,
        shuffle_buffer=30,
        pin_memory=False,
        weights=[0.5, 0.3, 0.2],
    )
    args.update(kw)
    return build_train_loader(sources, **args)


def test_default_weights_and_epochs_count_image_caption_pairs(sources: list[Path]) -> None:
    loaded = load_sources(sources)
    assert [s.num_samples for s in loaded] == [40, 20, 30]
    assert [s.num_captions for s in loaded] == [40, 100, 60]
    assert source_shares(loaded) == pytest.approx([0.2, 0.5, 0.3])  # pairs, not images (40/20/30)
    assert source_shares(load_sources(sources, [1.0, 1.0, 2.0])) == pytest.approx([0.25, 0.25, 0.5])


def test_every_batch_mixes_the_sources_by_weight(sources: list[Path], tokenizer) -> None:
    """300 batches of 8 from a 0.5/0.3/0.2 mix: each sample's source is a fresh draw, so per-batch counts
    are multinomial(8, p) -- not whole batches from one or two shards of one source."""
    probs = np.array([0.5, 0.3, 0.2])
    counts = np.stack(
        [np.bincount(batch["source"].numpy(), minlength=3) for batch in _loader(sources, tokenizer, num_steps=300)]
    )
    assert counts.shape == (300, 3) and (counts.sum(1) == 8).all()
    n = counts.sum()
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert (np.abs(counts.sum(0) / n - probs) < 4 * sigma).all(), counts.sum(0) / n  # overall shares
    # Per-batch spread: multinomial variance 8 p (1 - p) = 2.0 / 1.68 / 1.28; one source per batch
    # (shard-level mixing) would give 64 p (1 - p) = 16 / 13.4 / 10.2.
    var = counts.var(0, ddof=1)
    assert (var > 0.6 * 8 * probs * (1 - probs)).all() and (var < 1.5 * 8 * probs * (1 - probs)).all(), var
    assert (counts > 0).sum(1).mean() > 2.5  # expected sources per batch: 3 - sum (1 - p)^8 = 2.77
    single = (counts == 8).any(1).mean()
    assert single < 0.03  # P(a batch from one source) = 0.5^8 + 0.3^8 + 0.2^8 = 0.4%


def _fingerprint(batch: dict) -> tuple:
    return batch["step"], tuple(batch["key"]), batch["source"].tolist(), batch["image"].sum().item()


def test_mixed_stream_resumes_bit_exactly(sources: list[Path], tokenizer) -> None:
    kw = dict(num_workers=2, segment_steps=4, shuffle_buffer=12)
    full = [_fingerprint(b) for b in _loader(sources, tokenizer, num_steps=10, **kw)]
    assert [f[0] for f in full] == list(range(10))
    for start in (4, 5, 7):  # on a segment boundary, inside one, and with the other worker parity
        resumed = [_fingerprint(b) for b in _loader(sources, tokenizer, start_step=start, num_steps=10 - start, **kw)]
        assert resumed == full[start:]
    in_process = [_fingerprint(b) for b in _loader(sources, tokenizer, num_steps=10, **{**kw, "num_workers": 0})]
    assert [f[0] for f in in_process] == list(range(10))
    rank1 = [_fingerprint(b) for b in _loader(sources, tokenizer, num_steps=10, world_size=2, rank=1, **kw)]
    assert rank1 != full  # another rank, another stream
    state = torch.get_rng_state()
    again = [_fingerprint(b) for b in _loader(sources, tokenizer, num_steps=10, **kw)]
    assert again == full and torch.equal(torch.get_rng_state(), state)
