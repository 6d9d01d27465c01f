"""Momentum (EMA) twins of encoders, kept in fp32 whatever the trained model's dtype.

Design: a twin is a deep copy of its source module whose parameters are re-registered as persistent fp32
BUFFERS under the same names. Hence:
  - the state dict keeps the official names (`visual_encoder_m.blocks.0.attn.qkv.weight`, ...);
  - `model.parameters()` holds only trainable weights: optimizers, gradient hooks and DeepSpeed see no
    momentum weights, and DeepSpeed's mixed-precision cast (params only; fp32 buffers are preserved)
    never rounds them; `ALBEF._apply` keeps them fp32 under `.half()`/`.to(torch.bfloat16)` too;
  - the twins run fine under autocast (fp32 weights, low-precision matmuls) or in plain fp32.
The EMA upcasts the source weights, so one step is exactly m * theta_m + (1 - m) * theta in fp32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_momentum_twin", "ema_pairs", "ema_update_", "copy_into_"]


def make_momentum_twin(module: nn.Module) -> nn.Module:
    """Deep copy of `module` whose parameters become fp32 persistent buffers (requires_grad False)."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            # the deep copy already owns fresh storage: re-use it (a copy only if it was not fp32)
            sub.register_buffer(name, param.detach().float(), persistent=True)
    return twin


def ema_pairs(source: nn.Module, twin: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(twin tensors, source parameters) matched by name; fails loudly if the structures differ."""
    buffers = dict(twin.named_buffers())
    twins: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for name, param in source.named_parameters():
        if name not in buffers:
            raise KeyError(f"momentum twin has no tensor {name!r}")
        if buffers[name].shape != param.shape:
            raise ValueError(f"momentum twin {name!r}: shape {tuple(buffers[name].shape)} != {tuple(param.shape)}")
        twins.append(buffers[name])
        sources.append(param)
    return twins, sources


@torch.no_grad()
def ema_update_(twins: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """twin <- twin * m + theta * (1 - m), each product rounded in fp32 as in the official code."""
    if not twins:
        return
    if any(t.dtype != torch.float32 for t in twins):
        raise TypeError("momentum weights must be fp32 (an EMA step of 0.005 * delta rounds away in fp16/bf16)")
    src = [s.detach().to(torch.float32) for s in sources]  # no copy where already fp32
    if twins[0].device.type == "cpu":
        # One tensor at a time: the foreach form below allocates a second copy of every weight per step
        # (0.8 GB for ALBEF-base), and on the CPU those fresh pages cost more than the arithmetic
        # (0.14 vs 0.21-0.26 s per base step on one core). Same roundings.
        for twin, theta in zip(twins, src, strict=True):
            twin.mul_(momentum).add_(theta * (1.0 - momentum))
        return
    # On GPUs the step is bound by kernel launches: a few foreach kernels instead of 3 per tensor.
    torch._foreach_mul_(twins, momentum)
    torch._foreach_add_(twins, torch._foreach_mul(src, 1.0 - momentum))


@torch.no_grad()
def copy_into_(twins: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """twin <- theta (the initialisation, and after loading fresh encoder weights)."""
    for twin, src in zip(twins, sources, strict=True):
        twin.copy_(src.detach())
