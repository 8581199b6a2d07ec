"""Task losses and metrics, shared by training, evaluation and reports: each head's own
(:meth:`~matsci_ray.tasks.heads.Head.loss`, :meth:`~matsci_ray.tasks.heads.Head.metric_sums`)
on the structures its task scores.

Metric sums are accumulated per worker and all-reduced, so a metric over 2 workers equals the
metric over the same data on 1 worker: each worker may score a different number of rows (a
validation shard), none at all, or rows of other tasks only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from matsci_ray.config import LossConfig
from matsci_ray.graphs.collate import batch_targets, collate
from matsci_ray.potential import MatSciModel, Predictions


def task_losses(
    model: MatSciModel, preds: Predictions, batch: Any, config: LossConfig
) -> dict[str, Tensor]:
    """Scale-free loss per task; a task absent from the batch contributes an exact zero that
    still touches its head (DDP expects every parameter in every step)."""
    losses: dict[str, Tensor] = {}
    for name in model.heads:
        mask = model.mask(batch, name)
        if bool(mask.any()):
            losses[name] = model.head(name).loss(preds[name], batch, mask, config)
        else:
            losses[name] = preds[name]["value"].sum() * 0.0
    return losses


class MetricSums:
    """Sums behind each task's metrics, named ``<task>/<metric>``."""

    def __init__(
        self, model: MatSciModel, distributed: bool = True, device: torch.device | None = None
    ) -> None:
        self.model = model
        self.distributed = distributed
        self.device = device or torch.device("cpu")  # the collective's: NCCL reduces on CUDA
        self.sums: dict[str, list[float]] = {}  # key -> [sum, count]

    def _add(self, key: str, total: Tensor, count: int) -> None:
        entry = self.sums.setdefault(key, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += count

    @torch.no_grad()
    def update(self, preds: Predictions, batch: Any) -> None:
        for name in self.model.heads:
            sums = self.model.head(name).metric_sums(
                preds[name], batch, self.model.mask(batch, name)
            )
            for metric, (total, count) in sums.items():
                self._add(f"{name}/{metric}", total, count)

    def add_loss(self, name: str, loss: float, count: int) -> None:
        self._add(f"{name}/loss", torch.tensor(loss * count), count)

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Means over every worker's sums (all-reduced when torch.distributed is up). Every
        worker must call it: the keys are gathered first, since a worker that saw no row of
        a task (or no row at all) has no sums for it, and the all-reduce needs one layout."""
        distributed = self.distributed and dist.is_available() and dist.is_initialized()
        keys = _all_keys(self.sums) if distributed else sorted(self.sums)
        rows = [self.sums.get(k, [0.0, 0.0]) for k in keys]
        values = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)
        if distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        return {
            f"{prefix}{k}": float(v[0] / v[1]) if v[1] else float("nan")
            for k, v in zip(keys, values, strict=True)
        }


def _all_keys(sums: dict[str, list[float]]) -> list[str]:
    """The sorted union of every worker's metric keys."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(sums))
    return sorted({key for keys in gathered for key in keys or []})


def score(
    model: MatSciModel,
    row_batches: Iterable[dict[str, Any]],
    device: torch.device | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Every task's metrics over Ray Data row batches (numpy format), ``model`` in eval mode:
    this process's sums alone, or (``distributed``) every worker's, each scoring its shard."""
    return score_batches(model, collated(model, row_batches, device), device, distributed)


def collated(
    model: MatSciModel, row_batches: Iterable[dict[str, Any]], device: torch.device | None = None
) -> Iterator[Any]:
    """Row batches collated into graph batches with ``model``'s targets, on ``device``."""
    targets = batch_targets(model.tasks.values())
    for rows in row_batches:
        batch = collate(rows, targets, model.datasets)
        yield batch if device is None else batch.to(device)


def score_batches(
    model: MatSciModel,
    batches: Iterable[Any],
    device: torch.device | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """:func:`score` over batches already collated (:func:`collated`)."""
    model.eval()
    sums = MetricSums(model, distributed=distributed, device=device)
    for batch in batches:
        with torch.set_grad_enabled(model.needs_forces):  # forces are -dE/dr
            preds = model(batch)
        sums.update(preds, batch)
    return sums.compute()
