"""The EMA of the momentum twins: exactly the official m * theta_m + (1 - m) * theta, rounded in fp32."""

from __future__ import annotations

import pytest
import torch

from model.momentum import ema_update_


def test_ema_matches_the_official_formula_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (3, 5), (64, 48), (2, 3, 4)]
    twins = [torch.randn(s, generator=g) for s in shapes]
    sources = [torch.randn(s, generator=g) for s in shapes]
    sources[1] = sources[1].to(torch.bfloat16)  # a half-precision engine's weight: upcast first
    sources[3] = torch.randn(48, 64, generator=g).t()  # non-contiguous
    m = 0.995
    expected = [t * m + s.float() * (1 - m) for t, s in zip(twins, sources)]
    before = [t.data_ptr() for t in twins]
    ema_update_(twins, sources, m)
    assert [t.data_ptr() for t in twins] == before  # in place: the state dict's tensors
    for got, want in zip(twins, expected):
        assert torch.equal(got, want)


def test_ema_refuses_half_precision_twins() -> None:
    with pytest.raises(TypeError, match="fp32"):
        ema_update_([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], 0.995)
