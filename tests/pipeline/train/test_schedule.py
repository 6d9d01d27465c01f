"""LR and alpha schedules: pure functions of the optimizer step."""

from __future__ import annotations

import math

import pytest

from pipeline.train.schedule import alpha_at, lr_at

PAPER = dict(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=2000, total_steps=30 * 10000)


def test_warmup_is_linear_from_warmup_lr() -> None:
    assert lr_at(0, **PAPER) == pytest.approx(1e-5)
    assert lr_at(1000, **PAPER) == pytest.approx(5.5e-5)
    assert lr_at(2000, **PAPER) == pytest.approx(1e-4)  # peak exactly at the end of warm-up


def test_cosine_decay_to_min_lr_and_flat_after() -> None:
    mid = (PAPER["warmup_steps"] + PAPER["total_steps"]) // 2
    assert lr_at(mid, **PAPER) == pytest.approx((1e-4 + 1e-5) / 2)
    assert lr_at(PAPER["total_steps"], **PAPER) == pytest.approx(1e-5)
    assert lr_at(PAPER["total_steps"] + 500, **PAPER) == pytest.approx(1e-5)


def test_lr_is_monotone_within_each_phase_and_pure() -> None:
    warm = [lr_at(s, **PAPER) for s in range(0, 2001, 50)]
    decay = [lr_at(s, **PAPER) for s in range(2000, PAPER["total_steps"] + 1, 5000)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(12345, **PAPER) == lr_at(12345, **PAPER)  # no hidden state: resume-safe


def test_degenerate_schedules() -> None:
    assert lr_at(0, lr=1e-3, warmup_lr=0.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1e-3)
    assert lr_at(5, lr=1e-3, warmup_lr=0.0, min_lr=0.0, warmup_steps=10, total_steps=10) == pytest.approx(5e-4)
    assert lr_at(20, lr=1e-3, warmup_lr=0.0, min_lr=0.0, warmup_steps=10, total_steps=10) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        lr_at(-1, **PAPER)


def test_alpha_ramps_over_the_first_epoch() -> None:
    assert alpha_at(0, alpha=0.4, ramp_steps=100) == 0.0  # official: alpha * i / len(loader), i = 0 first
    assert alpha_at(50, alpha=0.4, ramp_steps=100) == pytest.approx(0.2)
    assert alpha_at(100, alpha=0.4, ramp_steps=100) == pytest.approx(0.4)
    assert alpha_at(10**6, alpha=0.4, ramp_steps=100) == pytest.approx(0.4)
    assert alpha_at(0, alpha=0.4, ramp_steps=0) == 0.4
    assert not math.isnan(alpha_at(3, alpha=0.0, ramp_steps=7))
