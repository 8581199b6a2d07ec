"""Training batches: the PyG batch of a Ray Data row batch, with what multi-task training needs.

A run's batches carry every target column of its tasks, and the data set each structure came
from, so each head scores only its own data set's structures (``MatSciModel.mask``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from matsci_ray.graphs.batching import rows_to_pyg_batch
from matsci_ray.tasks.registry import TaskSpec


def batch_targets(tasks: Iterable[TaskSpec]) -> list[str]:
    """The target columns ``tasks`` read, each once, in task order."""
    return list(dict.fromkeys(column for task in tasks for column in task.columns))


def collate(rows: dict[str, Any], targets: Sequence[str], datasets: Sequence[str]) -> Any:
    """PyG batch plus ``dataset_index`` (B,): which of ``datasets`` each structure came from
    (-1: none of them)."""
    batch = rows_to_pyg_batch(rows, targets)
    names = np.asarray(rows["dataset"]).astype(str)
    lookup = {name: k for k, name in enumerate(datasets)}
    batch.dataset_index = torch.as_tensor([lookup.get(n, -1) for n in names], dtype=torch.long)
    return batch
