"""The benchmark's tasks (the MatSciML paper's Table 1) and the heads that predict them."""

from matsci_ray.tasks.registry import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "get_task"]
