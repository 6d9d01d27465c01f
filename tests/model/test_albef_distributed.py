"""Two real processes on gloo: after enqueue of all-gathered momentum features, both ranks hold the same
queues, equal to the concatenation of both ranks' features in rank order; the pointer advances by B * world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import ALBEFConfig, all_gather_no_grad, build_albef

WORLD, B = 2, 4


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # ranks differ in global RNG state: queues must still agree
        model = build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000))
        initial = model.image_queue.clone()
        image = torch.randn(B, 3, 32, 32)
        ids = torch.randint(1000, 2000, (B, 8))
        ids[:, 0] = 101
        mask = torch.ones_like(ids)
        out = model(image, ids, mask, ids, torch.full_like(ids, -100), 0.4)
        model.enqueue(**{k: all_gather_no_grad(v) for k, v in out.queue_update().items()})  # the trainer's call
        torch.save(
            {
                "initial": initial,
                "image_feat_m": out.image_feat_m,
                "text_feat_m": out.text_feat_m,
                "image_queue": model.image_queue,
                "text_queue": model.text_queue,
                "ptr": model.queue_ptr,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_enqueue_gathers_both_ranks_in_order(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert torch.equal(r0["initial"], r1["initial"])
    assert not torch.equal(r0["image_feat_m"], r1["image_feat_m"])  # the ranks really saw different data
    for name in ("image_queue", "text_queue"):
        assert torch.equal(r0[name], r1[name])
    gathered_image = torch.cat([r0["image_feat_m"], r1["image_feat_m"]])  # rank order
    gathered_text = torch.cat([r0["text_feat_m"], r1["text_feat_m"]])
    assert torch.equal(r0["image_queue"][:, : B * WORLD], gathered_image.t())
    assert torch.equal(r0["text_queue"][:, : B * WORLD], gathered_text.t())
    assert torch.equal(r0["image_queue"][:, B * WORLD :], r0["initial"][:, B * WORLD :])
    assert int(r0["ptr"]) == int(r1["ptr"]) == B * WORLD
