"""Learning-rate schedules built from torch's schedulers (``optim.scheduler``).

Two clocks drive the learning rate:

- per optimiser step: a linear warm-up (``LinearLR``, ``optim.warmup_steps``), then for
  ``cosine`` a ``CosineAnnealingLR`` from lr down to :data:`MIN_LR_FRACTION` of it at the last
  planned step, chained by ``SequentialLR``; past the plan's last step the lr is held (the
  steps-per-epoch estimate may undercount, and a cosine run past ``T_max`` would climb again);
- per epoch, after validation: ``plateau`` is ``ReduceLROnPlateau`` on the primary validation
  metric, counted only once warm-up is over (a rising lr makes early epochs noisy, and a cut
  during warm-up would be rescaled by the warm-up's own multiplicative steps).

Every rank computes the same schedule: the step clock counts the same optimiser steps, and the
validation metrics are all-reduced, the same on every rank (``loop.validate``). The clock
counts global steps (each of the global batch, whatever the world size), so an elastic run
that shrinks or grows continues the same schedule; the plan's steps per epoch are those at
the largest world size (``trainer.build_trainer``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

from matsci_ray.config import OptimConfig

MIN_LR_FRACTION = 0.02  # where cosine ends and plateau cuts stop, as a fraction of the lr
STATE_VERSION = 1


class Schedule:
    """The learning rate of one run: call :meth:`step_batch` after every optimiser step and
    :meth:`step_epoch` after every validation; ``state_dict`` goes into checkpoints."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        optim: OptimConfig,
        steps_per_epoch: int,
        higher_is_better: bool,
    ) -> None:
        self.optimizer, self.optim = optimizer, optim
        for group in optimizer.param_groups:  # as torch's schedulers do: saved with the optimiser
            group.setdefault("initial_lr", group["lr"])
        if optim.max_steps_per_epoch is not None:  # epochs end there (the loops' islice)
            steps_per_epoch = min(steps_per_epoch, optim.max_steps_per_epoch)
        self.total = max(optim.epochs * steps_per_epoch, 1)
        self.steps = 0  # optimiser steps taken, whatever the scheduler
        self.epoch_start = 0  # ``steps`` when the current epoch began
        self.per_step, self.horizon = self._per_step()
        self.higher_is_better = higher_is_better
        self.plateau = self._plateau() if optim.scheduler == "plateau" else None

    def _start_lr(self) -> float:
        """The lr the schedule is relative to: the optimiser's (a checkpoint's, once loaded)."""
        return float(self.optimizer.param_groups[0]["initial_lr"])

    def _per_step(self) -> tuple[LRScheduler | None, int]:
        """The per-step scheduler and its last step (after which the lr is held)."""
        warmup, cosine = self.optim.warmup_steps, self.optim.scheduler == "cosine"
        phases: list[LRScheduler] = []
        if warmup:  # (k + 1) / warmup of the lr after k steps, the full lr from step warmup - 1
            phases.append(LinearLR(self.optimizer, 1.0 / warmup, 1.0, total_iters=warmup - 1))
        if cosine:
            span = max(self.total - warmup, 1)
            floor = MIN_LR_FRACTION * self._start_lr()
            phases.append(CosineAnnealingLR(self.optimizer, T_max=span, eta_min=floor))
            horizon = warmup + span
        elif warmup:
            # at the switch SequentialLR evaluates this in closed form: exactly the lr, where
            # warm-up's multiplicative steps end a rounding error away from it
            phases.append(ConstantLR(self.optimizer, factor=1.0, total_iters=0))
            horizon = warmup
        else:
            return None, 0
        if len(phases) == 1:
            return phases[0], horizon
        return SequentialLR(self.optimizer, phases, milestones=[warmup]), horizon

    def _plateau(self) -> ReduceLROnPlateau:
        """torch's ``patience`` is the bad epochs tolerated; ``optim.plateau_patience`` the bad
        epochs that cause a cut, as ``early_stopping_patience`` counts them. ``threshold=0``:
        any gain resets the count, the gain early stopping counts."""
        return ReduceLROnPlateau(
            self.optimizer,
            mode="max" if self.higher_is_better else "min",
            factor=self.optim.plateau_factor,
            patience=self.optim.plateau_patience - 1,
            threshold=0.0,
            eps=0.0,  # torch ignores cuts smaller than 1e-8 by default: every cut for lr < 2e-8
            min_lr=MIN_LR_FRACTION * self._start_lr(),
        )

    def step_batch(self) -> None:
        """After an optimiser step."""
        if self.per_step is not None and self.steps < self.horizon:
            self.per_step.step()
        self.steps += 1

    @property
    def steps_in_epoch(self) -> int:
        """Optimiser steps already taken in the current epoch (non-zero only in a checkpoint
        written mid-epoch, ``run.checkpoint_every_steps``)."""
        return self.steps - self.epoch_start

    def step_epoch(self, score: float) -> None:
        """After validation, with the epoch's primary metric. A NaN score (a diverged model)
        counts as an epoch without gain, as torch counts it."""
        self.epoch_start = self.steps
        if self.plateau is None or self.steps < self.optim.warmup_steps:
            return
        self.plateau.step(score)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _plan(self) -> dict[str, Any]:
        """What fixes the per-step scheduler's structure and values."""
        return {
            "scheduler": self.optim.scheduler,
            "warmup_steps": self.optim.warmup_steps,
            "horizon": self.horizon,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "plan": self._plan(),
            "steps": self.steps,
            "epoch_start": self.epoch_start,
            "per_step": self.per_step.state_dict() if self.per_step is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpoint's schedule; load the optimiser's state first (its lr).

        A checkpoint of the same plan continues exactly (torch's states). One of another plan
        (a resume that changed the scheduler, warm-up, epochs or steps per epoch) or written
        before this module (a ``LambdaLR`` of the same per-step values, its step count in
        ``last_epoch``) continues the current plan at the checkpoint's step count, as if it
        had been used from the start; plateau's count and cuts then start afresh."""
        self._load_steps(state)
        self.epoch_start = int(state.get("epoch_start", self.steps))  # older: epoch ends only

    def _load_steps(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("plan") != self._plan():
            self._replay(int(state.get("steps", state.get("last_epoch", 0))))
            return
        self.steps = int(state["steps"])
        if self.per_step is not None:
            self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau") is not None:
            self._load_plateau(state["plateau"])

    def _load_plateau(self, state: dict[str, Any]) -> None:
        """torch's state holds the settings too: those of the config win (a resume may change
        them, as ``check_resume`` reports), the counters and best score are the checkpoint's."""
        assert self.plateau is not None
        self.plateau.load_state_dict(state)
        self.plateau.factor = self.optim.plateau_factor
        self.plateau.patience = self.optim.plateau_patience - 1
        floor = MIN_LR_FRACTION * self._start_lr()
        self.plateau.min_lrs = [floor] * len(self.optimizer.param_groups)

    def _replay(self, steps: int) -> None:
        """The current plan's per-step lr after ``steps`` optimiser steps, from the start lr."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.per_step, self.horizon = self._per_step()
        if self.plateau is not None:
            self.plateau = self._plateau()
        self.steps = 0
        with warnings.catch_warnings():  # "scheduler stepped before the optimiser": on purpose
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(steps, self.horizon)):
                self.step_batch()
        self.steps = steps
