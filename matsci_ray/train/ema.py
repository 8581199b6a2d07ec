"""An exponential moving average of a model's weights (``optim.ema_decay``).

After every optimiser step each averaged parameter moves towards the trained one,
``avg ← avg + (1 − d) (w − avg)``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n``
updates: the warm-up (as in TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``)
keeps the first epochs' average from being mostly the random initial weights, which a decay of
0.999 would otherwise hold for thousands of steps. Buffers (normalisers, reference energies)
are copied, not averaged: they are set from data, not trained.

Under DDP every worker holds the same weights after a step (the gradients are all-reduced), so
each averages its own copy and the copies stay equal without communication.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ExponentialMovingAverage(Generic[ModuleT]):
    """``averaged``: a copy of the model whose parameters are the running average (eval mode,
    no gradients); call :meth:`update` after every optimiser step."""

    def __init__(self, model: ModuleT, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.averaged: ModuleT = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up's, until it reaches ``decay``)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (the model it was copied from)."""
        weight = 1.0 - self.current_decay()
        averaged = list(self.averaged.parameters())
        trained = [p.detach() for p in model.parameters()]
        if len(averaged) != len(trained):
            raise ValueError("EMA: the model's parameters are not those it was copied from")
        torch._foreach_lerp_(averaged, trained, weight)
        for mine, theirs in zip(self.averaged.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self, raw_model: nn.Module) -> dict[str, Any]:
        """What a checkpoint needs to continue the average exactly, beside the averaged
        weights it stores as its model: the decay, the update count and the trained (raw)
        weights that training goes on from."""
        return {"decay": self.decay, "updates": self.updates, "raw_model": raw_model.state_dict()}

    def load(self, averaged: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from a checkpoint: its averaged weights and update count."""
        self.averaged.load_state_dict(averaged)
        self.updates = int(updates)
