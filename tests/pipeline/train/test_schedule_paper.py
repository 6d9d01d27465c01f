"""The official fine-tuning LR (per-epoch cosine), max_steps as the schedule length, the geometry table."""

from __future__ import annotations

import math

import pytest

from pipeline.config import OptimConfig, TrainConfig
from pipeline.train.geometry import derive_geometry
from pipeline.train.schedule import lr_at

COCO = dict(lr=1e-5, warmup_lr=1e-5, min_lr=1e-6, warmup_steps=0)


def official_retrieval_lr(step: int, steps_per_epoch: int, epochs: int, lr: float, min_lr: float, warmup_lr: float):
    """LR of iteration `step` in the official Retrieval.py with ALBEF's scheduler config (cosine,
    warmup_epochs 1, warmup_lr = lr): a timm-style CosineLRScheduler(t_initial=epochs, warmup_t=1,
    warmup_prefix=True, cycle_limit=1) stepped with t = i // 100 after iterations i = 0 and 100 of
    epoch 0, and with t = epoch + 2 after each epoch (`lr_scheduler.step(epoch + warmup_steps + 1)`)."""

    def scheduler(t: int) -> float:
        if t < 1:
            return warmup_lr
        t -= 1  # warmup_prefix
        if t >= epochs:  # past the one cycle
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))

    epoch, i = divmod(step, steps_per_epoch)
    if epoch == 0:
        return scheduler(0) if i <= 100 else scheduler(1)  # the step(i // 100) call follows iteration i
    return scheduler(epoch + 1)


@pytest.mark.parametrize("epochs", [5, 10])  # COCO, Flickr30k
def test_per_epoch_cosine_is_the_official_retrieval_schedule(epochs: int) -> None:
    spe = 150
    for step in range(0, epochs * spe, 7):
        ours = lr_at(step, **COCO, total_steps=epochs * spe, schedule="per_epoch_cosine", steps_per_epoch=spe)
        assert ours == pytest.approx(official_retrieval_lr(step, spe, epochs, 1e-5, 1e-6, 1e-5), rel=1e-12), step
    assert lr_at(3 * spe - 1, **COCO, total_steps=epochs * spe, schedule="per_epoch_cosine", steps_per_epoch=spe) == (
        lr_at(2 * spe, **COCO, total_steps=epochs * spe, schedule="per_epoch_cosine", steps_per_epoch=spe)
    )  # constant within an epoch
    after = lr_at(epochs * spe + 3, **COCO, total_steps=epochs * spe, schedule="per_epoch_cosine", steps_per_epoch=spe)
    assert after == pytest.approx(1e-6)


def test_per_epoch_cosine_keeps_a_warm_up() -> None:
    kw = dict(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=20, total_steps=300)
    assert lr_at(10, **kw, schedule="per_epoch_cosine", steps_per_epoch=100) == pytest.approx(5.5e-5)
    assert lr_at(50, **kw, schedule="per_epoch_cosine", steps_per_epoch=100) == pytest.approx(1e-4)
    assert lr_at(150, **kw, schedule="per_epoch_cosine", steps_per_epoch=100) < 1e-4


def test_max_steps_defines_the_schedule_and_the_table_says_so() -> None:
    optim = OptimConfig(lr=1e-3, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=10)
    by_epochs = derive_geometry(TrainConfig(batch_size=8, epochs=1), optim, world_size=1, samples_per_epoch=2000)
    assert (by_epochs.total_steps, by_epochs.schedule_from) == (250, "train.epochs")
    short = derive_geometry(
        TrainConfig(batch_size=8, epochs=1, max_steps=400),
        optim,
        world_size=1,
        samples_per_epoch=2000,
        epoch_unit="image-caption pairs",
        source_shares=[("coco", 0.25), ("cc3m", 0.75)],
    )
    assert (short.total_steps, short.schedule_from, short.lr_schedule) == (400, "train.max_steps", "cosine")
    kw = dict(lr=1e-3, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=10, total_steps=short.total_steps)
    assert lr_at(250, **kw) > 1e-4  # the whole schedule spans max_steps, not the one epoch of 250 steps
    assert lr_at(400, **kw) == pytest.approx(1e-5)
    table = short.table()
    assert "2,000 image-caption pairs" in table and "400 steps (length set by train.max_steps)" in table
    assert "share of coco" in table and "25.0%" in table and "75.0%" in table
    assert short.to_dict()["source_shares"] == (("coco", 0.25), ("cc3m", 0.75))
