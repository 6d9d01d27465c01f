"""What every downstream-task model shares: a ViT, a BERT text/fusion encoder, task heads, and fp32
momentum twins of some of them (the distillation teacher).

`TaskModel` is the task-model counterpart of `ALBEFBase` without the ITC parts (projections, queues,
temperature), which the VE/NLVR/VQA models of the official code do not have. The same contract holds:
`forward` mutates nothing; the trainer calls `momentum_update()` once per optimizer step BEFORE the
forward (the official order: the forward starts with the EMA), and the twins stay fp32 and in eval
mode unless `momentum_dropout` (see model/momentum.py and model/albef.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

import torch
from torch import nn

from model.albef import _keep_fp32
from model.momentum import copy_into_, ema_pairs, ema_update_, make_momentum_twin

__all__ = ["TaskModel", "classifier_head"]

_Model = TypeVar("_Model", bound="TaskModel")


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """The official `cls_head`: Linear(width, width) -> ReLU -> Linear(width, num_classes) (keys 0.*, 2.*)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class TaskModel(nn.Module):
    """Base of the task models: momentum twins `<name>_m` of the modules named in `momentum_modules`.

    Subclasses build their modules, then call `_make_twins(momentum, momentum_dropout)` (a twin starts
    equal to its source, as the official `copy_params()` at construction).
    """

    momentum_modules: ClassVar[tuple[str, ...]] = ()
    _momentum: float
    _momentum_dropout: bool
    _twins: tuple[str, ...]

    def _make_twins(self, momentum: float, momentum_dropout: bool, enabled: bool = True) -> None:
        self._momentum = momentum
        self._momentum_dropout = momentum_dropout
        self._twins = tuple(f"{name}_m" for name in self.momentum_modules) if enabled else ()
        for name in self.momentum_modules if enabled else ():
            setattr(self, f"{name}_m", make_momentum_twin(getattr(self, name)))
        self.train()

    @property
    def has_teacher(self) -> bool:
        return bool(self._twins)

    def _ema_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        twins: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for twin_name in self._twins:
            t, s = ema_pairs(getattr(self, twin_name[:-2]), getattr(self, twin_name))
            twins += t
            sources += s
        return twins, sources

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA theta_m <- m * theta_m + (1 - m) * theta in fp32; once per optimizer step, before the forward."""
        ema_update_(*self._ema_lists(), self._momentum)

    @torch.no_grad()
    def copy_params(self, twins: Iterable[str] | None = None) -> None:
        """Momentum twins (all, or those named, e.g. "cls_head_m") <- trained weights."""
        for twin_name in self._twins if twins is None else twins:
            copy_into_(*ema_pairs(getattr(self, twin_name[:-2]), getattr(self, twin_name)))

    def momentum_twins(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self._twins]

    def train(self: _Model, mode: bool = True) -> _Model:
        super().train(mode)
        if not getattr(self, "_momentum_dropout", True):
            for twin in self.momentum_twins():
                twin.eval()
        return self

    def _apply(self: _Model, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _Model:
        """Momentum twins follow device moves but stay fp32 under `.half()`/`.to(dtype)`."""
        if recurse:
            keep = _keep_fp32(fn)
            twins = set(getattr(self, "_twins", ()))
            for name, child in self.named_children():
                child._apply(keep if name in twins else fn)
        super()._apply(fn, recurse=False)
        return self
