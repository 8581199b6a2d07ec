"""Task losses and metrics, shared by training, evaluation and reports.

Metric sums are accumulated per worker and all-reduced, so a metric over 2 workers equals the
metric over the same data on 1 worker.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from matsci_ray.config import LossConfig
from matsci_ray.keys import ENERGY, FORCES
from matsci_ray.potential import MatSciModel, Predictions
from matsci_ray.tasks.heads import ClassHead, EnergyHead


def _masked(tensor: Tensor, mask: Tensor) -> Tensor:
    return tensor[mask]


def task_losses(
    model: MatSciModel, preds: Predictions, batch: Any, config: LossConfig
) -> dict[str, Tensor]:
    """Scale-free loss per task; a task absent from the batch contributes an exact zero that
    still touches its head (DDP expects every parameter in every step)."""
    losses: dict[str, Tensor] = {}
    for name, task in model.tasks.items():
        head = model.head(name)
        value = preds[name]["value"]
        if task.kind == "forces":
            assert isinstance(head, EnergyHead)
            mask = model.mask(batch, name, ENERGY)
            atom_mask = model.force_atoms(batch, name, mask)
            e_loss = head.loss(
                _masked(value, mask),
                _masked(batch[ENERGY], mask),
                _masked(batch.natoms, mask).to(value.dtype),
            )
            f_loss = head.force_loss(
                _masked(preds[name]["forces"], atom_mask),
                _masked(batch[FORCES], atom_mask),
                config.force_loss or task.force_loss,
            )
            force_weight = task.force_weight if config.force_weight is None else config.force_weight
            loss = config.energy_weight * e_loss + force_weight * f_loss
        else:
            mask = model.mask(batch, name, task.target)
            pred, target = _masked(value, mask), _masked(batch[task.target], mask)
            if isinstance(head, EnergyHead):
                loss = head.loss(pred, target, _masked(batch.natoms, mask).to(value.dtype))
            else:
                loss = head.loss(pred, target)  # type: ignore[operator]
        if not bool(mask.any()):
            loss = value.sum() * 0.0
        losses[name] = loss
    return losses


class MetricSums:
    """Sums behind each task's metric (and the energy MSE of force tasks)."""

    def __init__(self, model: MatSciModel, distributed: bool = True) -> None:
        self.model = model
        self.distributed = distributed
        self.sums: dict[str, list[float]] = {}  # key -> [sum, count]

    def _add(self, key: str, total: Tensor, count: int) -> None:
        entry = self.sums.setdefault(key, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += count

    @torch.no_grad()
    def update(self, preds: Predictions, batch: Any) -> None:
        for name, task in self.model.tasks.items():
            value = preds[name]["value"].detach()
            target_name = ENERGY if task.kind == "forces" else task.target
            mask = self.model.mask(batch, name, target_name)
            pred, target = value[mask], batch[target_name][mask]
            n = int(mask.sum())
            if task.kind == "forces":
                self._add(f"{name}/energy_mse", (pred - target).pow(2).sum(), n)
                err = (preds[name]["forces"].detach() - batch[FORCES]).abs()
                atoms = self.model.force_atoms(batch, name, mask)
                self._add(f"{name}/mae", err[atoms].sum(), err[atoms].numel())
                if task.free_atoms_only:  # every atom too, comparable with other force sets
                    every = mask[batch.batch]
                    self._add(f"{name}/mae_all_atoms", err[every].sum(), err[every].numel())
            elif isinstance(self.model.head(name), ClassHead):
                head = self.model.head(name)
                assert isinstance(head, ClassHead)
                correct = (head.predict_class(pred) == target.long()).sum()
                self._add(f"{name}/accuracy", correct, n)
            else:
                self._add(f"{name}/mse", (pred - target).pow(2).sum(), n)
                self._add(f"{name}/mae", (pred - target).abs().sum(), n)

    def add_loss(self, name: str, loss: float, count: int) -> None:
        self._add(f"{name}/loss", torch.tensor(loss * count), count)

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Means over every worker's sums (all-reduced when torch.distributed is up)."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64).reshape(-1, 2)
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        return {
            f"{prefix}{k}": float(v[0] / v[1]) if v[1] else float("nan")
            for k, v in zip(keys, values, strict=True)
        }
