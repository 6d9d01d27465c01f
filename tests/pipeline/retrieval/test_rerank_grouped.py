"""Grouped re-ranking (image keys/values cached, both sides merged, captions packed) returns today's
scores: vs the batched fast path and the official-arithmetic loop, in one process and over 2 gloo ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_rerank import tiny_encoded

from pipeline.retrieval.metrics import retrieval_metrics
from pipeline.retrieval.rerank import (
    SCORE_NAMES,
    EncodedSplit,
    image_range,
    pair_set,
    rerank_naive,
    score_matrices,
    score_matrices_grouped,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _index_maps(n_img: int, per_image: int) -> tuple[list[list[int]], torch.Tensor]:
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)]
    return img2txt, torch.arange(n_img).repeat_interleave(per_image)


@pytest.mark.parametrize("k", [3, 7, 100])
@pytest.mark.parametrize("pairs_per_batch", [4, 1024])
def test_grouped_equals_batched_and_official(k: int, pairs_per_batch: int) -> None:
    model, enc = tiny_encoded(n_img=12, per_image=3)
    official = score_matrices(enc, k, lambda i, t, m: model.itm_logits(t, m, i), trim_padding=False)
    batched = score_matrices(enc, k, lambda i, t, m: model.itm_logits_cls(t, m, i), pairs_per_batch=pairs_per_batch)
    grouped = score_matrices_grouped(enc, k, model, pairs_per_batch=pairs_per_batch)
    img2txt, txt2img = _index_maps(12, 3)
    assert tuple(grouped) == tuple(official) == SCORE_NAMES
    for name in SCORE_NAMES:
        for ref, fast, other in zip(official[name], grouped[name], batched[name]):
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(fast)) and torch.equal(finite, torch.isfinite(other))
            assert (fast[finite] - ref[finite]).abs().max() <= 1e-5
            assert (fast[finite] - other[finite]).abs().max() <= 1e-5
        assert retrieval_metrics(*grouped[name], img2txt, txt2img) == retrieval_metrics(
            *official[name], img2txt, txt2img
        )
    assert grouped["itm"][0][torch.isfinite(grouped["itm"][0])].std() > 0  # a real signal


def test_naive_loop_rows_match_grouped() -> None:
    model, enc = tiny_encoded(n_img=6, per_image=2)
    grouped = score_matrices_grouped(enc, 4, model)
    for i, (side, sims) in enumerate((("i2t", enc.similarity()), ("t2i", enc.similarity().T))):
        naive = rerank_naive(enc, sims, 4, side, lambda img, t, m: model.itm_logits(t, m, img))
        rows = grouped["itm"][i].gather(1, naive.topk_idx)
        assert (rows - naive.itm).abs().max() <= 1e-5
        logit = grouped["itm_itc_logit"][i].gather(1, naive.topk_idx)
        assert (logit - (naive.itm_logodds + naive.topk_sim / enc.temp)).abs().max() <= 1e-4


def test_pair_set_merges_both_sides() -> None:
    sims = torch.randn(5, 9)
    pairs = pair_set(sims, 3)
    assert pairs.i2t[1].shape == (5, 3) and pairs.t2i[1].shape == (9, 3)
    keys = pairs.image * 9 + pairs.text
    assert torch.equal(keys, keys.unique())  # unique and sorted by (image, caption)
    i2t_img = torch.arange(5).repeat_interleave(3)
    t2i_txt = torch.arange(9).repeat_interleave(3)
    back = keys[pairs.inverse]
    assert torch.equal(back[:15], i2t_img * 9 + pairs.i2t[1].reshape(-1))
    assert torch.equal(back[15:], pairs.t2i[1].reshape(-1) * 9 + t2i_txt)
    assert torch.equal(pairs.image_start[1:] - pairs.image_start[:-1], torch.bincount(pairs.image, minlength=5))


def test_image_range_partitions_whole_images() -> None:
    starts = torch.tensor([0, 0, 10, 11, 30, 31, 31, 60])  # 7 images, uneven pair counts, some empty
    for world in (1, 2, 3, 5, 9):
        ranges = [image_range(starts, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 7
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        image_range(starts, 2, 2)


def _worker(rank: int, world: int, port: int, enc: EncodedSplit, model_state: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = tiny_encoded(n_img=1, per_image=1)
        model.load_state_dict(model_state)
        result = score_matrices_grouped(enc, 5, model, rank=rank, world_size=world, pairs_per_batch=3)
        out[rank] = {f"{name}_{i}": m for name, pair in result.items() for i, m in enumerate(pair)}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process() -> None:
    model, enc = tiny_encoded(n_img=10, per_image=3)
    single = score_matrices_grouped(enc, 5, model, pairs_per_batch=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, enc, model.state_dict(), out), nprocs=2, join=True)
    for rank in range(2):
        for name, pair in single.items():
            for i, matrix in enumerate(pair):
                assert torch.equal(out[rank][f"{name}_{i}"], matrix), (rank, name, i)
