"""Training batches: the PyG batch of a Ray Data row batch, with what multi-task training needs.

A run's batches carry every target column of its tasks, and the data set each structure came
from, so each head scores only its own data set's structures (``MatSciModel.mask``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from matsci_ray import keys as K
from matsci_ray.graphs.batching import rows_to_pyg_batch
from matsci_ray.tasks.registry import TaskSpec


def batch_targets(tasks: Iterable[TaskSpec]) -> list[str]:
    """The target columns ``tasks`` read, each once, in task order; a force task's stress
    among them (an optional column: :data:`OPTIONAL_TARGETS`)."""
    tasks = list(tasks)
    columns = [column for task in tasks for column in task.columns]
    if any(task.kind == "forces" for task in tasks):
        columns.append(K.STRESS)
    return list(dict.fromkeys(columns))


# Read where a batch has the column: stress is learned where a data set has it, and a batch
# built without it (rows from before the column, hand-made rows) still collates.
OPTIONAL_TARGETS = (K.STRESS,)


def collate(rows: dict[str, Any], targets: Sequence[str], datasets: Sequence[str]) -> Any:
    """PyG batch plus ``dataset_index`` (B,): which of ``datasets`` each structure came from
    (-1: none of them)."""
    required = [t for t in targets if t not in OPTIONAL_TARGETS]
    optional = [t for t in targets if t in OPTIONAL_TARGETS]
    batch = rows_to_pyg_batch(rows, required, optional)
    names = np.asarray(rows["dataset"]).astype(str)
    lookup = {name: k for k, name in enumerate(datasets)}
    batch.dataset_index = torch.as_tensor([lookup.get(n, -1) for n in names], dtype=torch.long)
    return batch
