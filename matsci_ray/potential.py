"""``MatSciModel``: a shared encoder with one head per task, forces by autograd.

Forces are always the negative gradient of a head's energy with respect to positions
(conservative), so any encoder becomes a force field without force-specific code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from matsci_ray.models import build_encoder
from matsci_ray.models.base import Encoder
from matsci_ray.tasks.heads import Head, TaskPredictions, build_head, target_mask
from matsci_ray.tasks.registry import TASKS, TaskSpec

if TYPE_CHECKING:
    from matsci_ray.config import ExperimentConfig

Predictions = dict[str, TaskPredictions]  # per task


class MatSciModel(nn.Module):
    def __init__(self, encoder: Encoder, tasks: list[TaskSpec], head_hidden: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.datasets = list(dict.fromkeys(t.dataset for t in tasks))
        # DDP expects every parameter in every step: when every head reads atoms (energies),
        # the encoder's structure readout (MEGNet's Set2Set) must join the graph as an exact zero
        self._graph_unread = all(t.readout != "graph" for t in tasks)
        self.heads = nn.ModuleDict(
            {t.name: build_head(t, encoder.node_dim, encoder.graph_dim, head_hidden) for t in tasks}
        )

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> MatSciModel:
        """The untrained model of an experiment: its encoder and one head per task."""
        encoder = build_encoder(config.model.name, config.data.cutoff, config.model.params)
        return cls(encoder, [TASKS[t] for t in config.tasks], config.model.head_hidden)

    @property
    def needs_forces(self) -> bool:
        return any(t.kind == "forces" for t in self.tasks.values())

    def fit_normalisation(self, summaries: dict[str, dict[str, Any]]) -> None:
        """``summaries``: data set name → its manifest's train-split summary."""
        for name, head in self.heads.items():
            head.fit_normalisation(summaries[self.tasks[name].dataset])

    def mask(self, batch: Any, name: str) -> Tensor:
        """Structures task ``name`` scores: they carry its ``value_target`` and come from its
        data set (``batch.dataset_index``, set by training collation; absent at inference)."""
        task = self.tasks[name]
        mask = target_mask(batch, task.value_target, batch.num_graphs)
        index = getattr(batch, "dataset_index", None)
        if index is not None and len(self.datasets) > 1:
            mask = mask & (index == self.datasets.index(task.dataset))
        return mask

    def head(self, name: str) -> Head:
        return self.heads[name]  # type: ignore[return-value]

    def forward(self, batch: Any, forces: bool | None = None) -> Predictions:
        """Per task: ``{"value": (B,) or logits}``, plus ``"forces"`` (N, 3) for force tasks."""
        want_forces = self.needs_forces if forces is None else forces
        if want_forces and not batch.pos.requires_grad:
            batch.pos.requires_grad_(True)
        out = self.encoder(batch)
        if self._graph_unread:
            out = out._replace(node=out.node + 0.0 * out.graph.sum())
        preds: Predictions = {}
        for name, head in self.heads.items():
            value = head(out, batch)
            preds[name] = {"value": value}
            if want_forces and self.tasks[name].kind == "forces":
                (grad,) = torch.autograd.grad(
                    value.sum(), batch.pos, create_graph=self.training, retain_graph=True
                )
                preds[name]["forces"] = -grad
        return preds
