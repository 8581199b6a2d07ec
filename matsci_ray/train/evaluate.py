"""Score a checkpoint on a split of its data set, outside Ray Train (driver-side streaming)."""

from __future__ import annotations

import itertools

from matsci_ray.config import ExperimentConfig
from matsci_ray.potential import MatSciModel
from matsci_ray.storage import Location, location, resolve
from matsci_ray.tasks.registry import TASKS
from matsci_ray.train.checkpoint import load_model
from matsci_ray.train.metrics import score
from matsci_ray.train.trainer import graph_dataset


def evaluate_checkpoint(
    checkpoint: Location | str, split: str = "test", data_root: Location | str | None = None
) -> dict[str, float]:
    """Metrics of every task of ``checkpoint`` on ``split`` (needs a running Ray)."""
    model, config, _ = load_model(checkpoint)
    return evaluate_model(model, config, split, data_root)


def evaluate_model(
    model: MatSciModel,
    config: ExperimentConfig,
    split: str = "test",
    data_root: Location | str | None = None,
) -> dict[str, float]:
    """Metrics of every task of a loaded ``model`` on ``split`` of its ``config``'s data
    (needs a running Ray)."""
    if data_root is not None:
        config.data.root = resolve(location(data_root))
    rows = itertools.chain.from_iterable(
        graph_dataset(config, dataset, split).iter_batches(
            batch_size=config.data.batch_size, batch_format="numpy"
        )
        for dataset in config.datasets
    )
    return score(model, rows)


def metric_table(metrics: dict[str, float], split: str) -> str:
    """Markdown table: task, metric, value, unit."""
    lines = [f"| task | metric ({split}) | value | unit |", "|---|---|---|---|"]
    for key in sorted(metrics):
        task_name, _, metric = key.partition("/")
        if metric == "loss":
            continue
        task = TASKS.get(task_name)
        unit = ""
        if task is not None:
            base = "eV" if metric == "energy_mse" else task.unit.strip("()²")
            unit = (
                f"({base})²" if "mse" in metric and base else (base if metric != "accuracy" else "")
            )
        lines.append(f"| {task_name} | {metric} | {metrics[key]:.6g} | {unit} |")
    return "\n".join(lines)
