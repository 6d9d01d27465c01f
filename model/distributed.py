"""The one collective the model needs: gathering momentum features for the queues."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_no_grad"]


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0, in rank order -> [B * world, ...].

    Identity when torch.distributed is not initialised (single process). No gradient flows: only
    momentum features (already no-grad) are gathered, for the queues. Every rank must pass the same B.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
